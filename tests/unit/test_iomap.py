"""Reading a physical output back as its logical dtype (Core ML returns booleans as numbers)."""

from __future__ import annotations

import numpy as np

from portable_models.core.iomap import Binding


def test_a_boolean_output_is_read_back_only_when_every_value_is_0_or_1() -> None:
    binding = Binding(name="keep", reads_as="bool")
    back = binding.to_logical(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    assert back.dtype == np.bool_ and back.tolist() == [[True, False], [False, True]]
    other = binding.to_logical(np.array([1.0, 0.5], dtype=np.float32))  # not a mask: left as numbers
    assert other.dtype == np.float32
    assert Binding.from_dict(binding.to_dict()) == binding
    assert "reads_as" not in Binding(name="y").to_dict()
