"""The contract: its model and schema (:mod:`.model`), the bundle folder written atomically,
its hashes and path confinement (:mod:`.bundle`), what verify may run from an untrusted
bundle (:mod:`.trust`), and the reports for people and machines (:mod:`.reports`)."""
