//! PyO3 bindings only: NumPy in and out, GIL release, error mapping. Validation of shapes and
//! dtypes happens in `python/approx_attn/__init__.py`; the logic lives in the crate.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;
use crate::{device, Problem, Report, RunOptions};

create_exception!(
    _core,
    NoDeviceError,
    PyRuntimeError,
    "No GPU adapter could be used."
);
create_exception!(
    _core,
    DeviceError,
    PyRuntimeError,
    "The GPU failed (validation, device loss)."
);

fn to_py(e: Error) -> PyErr {
    match e {
        Error::NoDevice(m) => NoDeviceError::new_err(m),
        Error::InvalidInput(m) | Error::TooLarge(m) => PyValueError::new_err(m),
        Error::Unsupported(m) => PyNotImplementedError::new_err(m),
        Error::OutOfMemory(m) => PyMemoryError::new_err(m),
        Error::DeviceLost(m) | Error::Gpu(m) => DeviceError::new_err(m),
    }
}

fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("method", r.method)?;
    d.set_item("adapter", &r.adapter)?;
    d.set_item("backend", &r.backend)?;
    d.set_item("fast_memory_words", r.fast_memory_words)?;
    d.set_item("io_words", r.io_words)?;
    d.set_item("io_reads", r.io_reads)?;
    d.set_item("io_writes", r.io_writes)?;
    d.set_item(
        "io_words_counted",
        r.stats.io_words_counted.map(|(a, b)| a + b),
    )?;
    d.set_item("kernel_s", r.stats.kernel_s)?;
    d.set_item("dispatches", r.stats.dispatches)?;
    d.set_item("elapsed_s", r.elapsed_s)?;
    d.set_item("plan", &r.plan)?;
    Ok(d)
}

/// Exact attention on flattened contiguous float32 arrays; returns (flat output, report dict).
#[pyfunction]
#[pyo3(signature = (q, k, v, units, group, l, s, e, ev, causal, scale, trusted=false, count_io=false))]
#[allow(clippy::too_many_arguments)]
fn exact<'py>(
    py: Python<'py>,
    q: PyReadonlyArray1<'py, f32>,
    k: PyReadonlyArray1<'py, f32>,
    v: PyReadonlyArray1<'py, f32>,
    units: usize,
    group: usize,
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
    causal: bool,
    scale: f32,
    trusted: bool,
    count_io: bool,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyDict>)> {
    // Copy while holding the GIL: other Python threads may mutate the arrays once it is released.
    let (q, k, v) = (
        q.as_array().to_vec(),
        k.as_array().to_vec(),
        v.as_array().to_vec(),
    );
    let p = Problem {
        units,
        group,
        l,
        s,
        e,
        ev,
        causal,
        scale,
    };
    let opts = RunOptions { trusted, count_io };
    let (out, report) = py
        .detach(|| crate::exact_attention(&p, &q, &k, &v, &opts))
        .map_err(to_py)?;
    Ok((PyArray1::from_vec(py, out), report_dict(py, &report)?))
}

#[pyfunction]
fn device_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let gpu = py.detach(device::gpu).map_err(to_py)?;
    let i = &gpu.info;
    let d = PyDict::new(py);
    d.set_item("adapter", &i.adapter)?;
    d.set_item("backend", &i.backend)?;
    d.set_item("device_type", &i.device_type)?;
    d.set_item("driver", &i.driver)?;
    d.set_item("fast_memory_words", i.fast_memory_words)?;
    d.set_item(
        "max_storage_buffer_binding_size",
        i.max_storage_buffer_binding_size,
    )?;
    d.set_item("max_buffer_size", i.max_buffer_size)?;
    d.set_item(
        "max_compute_invocations_per_workgroup",
        i.max_compute_invocations_per_workgroup,
    )?;
    d.set_item(
        "max_compute_workgroups_per_dimension",
        i.max_compute_workgroups_per_dimension,
    )?;
    d.set_item(
        "max_storage_buffers_per_shader_stage",
        i.max_storage_buffers_per_shader_stage,
    )?;
    d.set_item("shader_f16", i.shader_f16)?;
    d.set_item("subgroups", i.subgroups)?;
    d.set_item("timestamp_queries", i.timestamp_queries)?;
    d.set_item("cooperative_matrix", i.cooperative_matrix)?;
    Ok(d)
}

/// Every adapter wgpu sees: (name, backend, device type).
#[pyfunction]
fn list_adapters(py: Python<'_>) -> PyResult<Vec<(String, String, String)>> {
    py.detach(device::list_adapters).map_err(to_py)
}

/// Destroys the current device, as a driver reset would; the next call must create a new one.
#[pyfunction]
fn _destroy_device(py: Python<'_>) -> PyResult<()> {
    let gpu = py.detach(device::gpu).map_err(to_py)?;
    gpu.device.destroy();
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(exact, m)?)?;
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    m.add_function(wrap_pyfunction!(list_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(_destroy_device, m)?)?;
    m.add("NoDeviceError", m.py().get_type::<NoDeviceError>())?;
    m.add("DeviceError", m.py().get_type::<DeviceError>())?;
    Ok(())
}
