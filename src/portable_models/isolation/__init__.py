"""Process isolation: the worker pool (:mod:`.pool`), one worker process (:mod:`.process`),
the worker's own main loop (:mod:`.child`), the job kinds it runs, by dotted path
(:mod:`.jobs`), how a verify's runs are spread over workers (:mod:`.lanes`), and the OS
sandbox of the workers that load a bundle's artifacts (:mod:`.sandbox`)."""
