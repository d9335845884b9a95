"""Type stubs of the PyO3 extension (src/python.rs). Use the wrappers in approx_attn instead."""

from typing import Any

import numpy as np
import numpy.typing as npt

class NoDeviceError(RuntimeError): ...
class DeviceError(RuntimeError): ...

def attention(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    units: int,
    group: int,
    l: int,
    s: int,
    e: int,
    ev: int,
    causal: bool,
    scale: float,
    method: str,
    eps: float,
    degree: int | None,
    check_finite: bool,
    trusted: bool = False,
    count_io: bool = False,
    tensor_cores: bool | None = None,
    f16_inputs: bool = False,
    f16_storage: tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16], npt.NDArray[np.uint16]]
    | None = None,
    f16_rounded: bool = False,
) -> dict[str, Any]: ...
def exact_attention_lse(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    units: int,
    group: int,
    l: int,
    s: int,
    e: int,
    ev: int,
    causal: bool,
    scale: float,
    count_io: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], dict[str, Any]]: ...
def poly_kernel_attention(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    units: int,
    group: int,
    l: int,
    s: int,
    e: int,
    ev: int,
    causal: bool,
    scale: float,
    coeffs: list[float],
    normalize: bool,
    log_gates: npt.NDArray[np.float32] | None = None,
    initial_state: npt.NDArray[np.float32] | None = None,
    return_state: bool = False,
    count_io: bool = False,
) -> tuple[npt.NDArray[np.float32] | None, dict[str, Any]]: ...
def poly_kernel_rank(e: int, coeffs: list[float]) -> int: ...
def io_cost(
    units: int,
    group: int,
    l: int,
    s: int,
    e: int,
    ev: int,
    causal: bool,
    method: str,
    degree: int | None = None,
    eps: float | None = None,
    beta: float | None = None,
    fast_memory_words: int | None = None,
    storage: str = "float32",
) -> dict[str, Any]: ...
def io_closed_form(
    l: float, s: float, d: float, r: float, m: float
) -> tuple[float, float, float, float, float, float]: ...
def num_features(e: int, g: int) -> int: ...
def fit_polynomial(
    beta: float, degree: int | None = None, eps: float | None = None
) -> tuple[int, list[float], float]: ...
def certified_polynomial(
    beta: float, e: int, eps: float, degree: int | None = None
) -> tuple[int, list[float], float]: ...
def device_info() -> dict[str, Any]: ...
def list_adapters() -> list[tuple[str, str, str]]: ...
def _destroy_device() -> None: ...
def _f16_to_f32(src: npt.NDArray[np.uint16], dst: npt.NDArray[np.float32]) -> int: ...
def _f16_nonfinite(src: npt.NDArray[np.uint16]) -> int: ...
def _f32_to_f16(src: npt.NDArray[np.float32], dst: npt.NDArray[np.uint16]) -> None: ...
def _panic_for_test() -> None: ...
def empty_cache() -> int: ...

class DeviceState:
    """A polynomial-attention state in GPU memory between decoding steps."""

    max_step_tokens: int
    def __init__(
        self,
        state: npt.NDArray[np.float32],
        units: int,
        group: int,
        e: int,
        ev: int,
        coeffs: list[float],
        scale: float,
        normalize: bool,
        unrolled: bool | None = None,
    ) -> None: ...
    def step(
        self,
        q: npt.NDArray[np.float32],
        k: npt.NDArray[np.float32],
        v: npt.NDArray[np.float32],
        n: int,
        log_gates: npt.NDArray[np.float32] | None = None,
    ) -> tuple[npt.NDArray[np.float32], bool]: ...
    def to_numpy(self) -> npt.NDArray[np.float32]: ...
