"""core.runtime.torch_helpers: what --dtype means on each device, for every model service."""

from __future__ import annotations

import pytest

from core.runtime.torch_helpers import dtype_name, torch_dtype


@pytest.mark.parametrize(("device", "expected"), [("cuda", "bfloat16"), ("cuda:1", "bfloat16"), ("cpu", "float32")])
def test_auto_is_bfloat16_on_cuda_and_float32_on_cpu(device: str, expected: str) -> None:
    assert dtype_name("auto", device) == expected


def test_a_service_may_choose_its_own_cuda_default() -> None:
    assert dtype_name("auto", "cuda", cuda_default="float16") == "float16"
    assert dtype_name("auto", "cpu", cuda_default="float16") == "float32"


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_name_is_kept_on_any_device(name: str) -> None:
    assert dtype_name(name, "cpu") == dtype_name(name, "cuda") == name


def test_an_unknown_name_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'.*bfloat16"):
        dtype_name("float8", "cuda")


def test_torch_dtype_is_the_torch_object() -> None:
    torch = pytest.importorskip("torch")
    assert torch_dtype("auto", "cpu") is torch.float32
    assert torch_dtype("auto", "cuda") is torch.bfloat16
