//! PyO3 bindings only: NumPy in and out, GIL release, error mapping. Validation of shapes and
//! dtypes happens in `python/approx_attn/__init__.py`; the logic lives in the crate.

use numpy::{PyArray1, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::create_exception;
use pyo3::exceptions::{
    PyKeyboardInterrupt, PyMemoryError, PyNotImplementedError, PyOverflowError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;
use crate::{device, Method, PolyOptions, Problem, Report, RunOptions};

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
        Error::Overflow(m) => PyOverflowError::new_err(m),
        Error::OutOfMemory(m) => PyMemoryError::new_err(m),
        Error::DeviceLost(m) | Error::Gpu(m) => DeviceError::new_err(m),
        Error::Interrupted(m) => PyKeyboardInterrupt::new_err(m),
    }
}

/// Runs Python's signal handlers (with the GIL, briefly) for a call waiting on the GPU: true
/// where one raised (Ctrl-C raises KeyboardInterrupt), which ends the call with that exception.
fn python_signal_raised() -> bool {
    Python::attach(|py| py.check_signals().is_err())
}

/// Runs `f` without the GIL. A Rust panic inside becomes a `DeviceError` that names it: it would
/// reach Python as `pyo3_runtime.PanicException`, a `BaseException` that `except Exception`
/// does not catch.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Gpu(format!(
                "internal error (a bug in approx_attn; please report it): {what}"
            )))
        })
    })
    .map_err(to_py)
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
    d.set_item("pass_s", r.stats.pass_s.clone())?;
    d.set_item("host_s", r.stats.traffic.host_s())?;
    d.set_item("gpu_allocated_bytes", r.stats.gpu_allocated_bytes)?;
    d.set_item("slices", r.stats.traffic.input_slices)?;
    d.set_item("host_to_device_bytes", r.stats.traffic.to_device_bytes)?;
    d.set_item("device_to_host_bytes", r.stats.traffic.to_host_bytes)?;
    d.set_item("elapsed_s", r.elapsed_s)?;
    d.set_item("plan", &r.plan)?;
    d.set_item("predicted_exact_s", r.predicted_exact_s)?;
    d.set_item("predicted_poly_s", r.predicted_poly_s)?;
    d.set_item("reason", &r.reason)?;
    d.set_item("tensor_cores", r.tensor_cores)?;
    d.set_item("storage", r.storage.name())?;
    d.set_item("unit_roundoff", r.storage.unit_roundoff())?;
    d.set_item("input_rounding", r.input_rounding)?;
    if let Some(b) = &r.exact_f16 {
        d.set_item("f16_rounding", b.weight_factor)?;
        d.set_item("score_rounding", b.score_rounding)?;
        d.set_item("error_bound_per_column", b.error_bound_per_column.clone())?;
    }
    if let Some(c) = &r.certificate {
        d.set_item("degree", c.degree)?;
        d.set_item("rank", c.rank)?;
        d.set_item("beta", c.beta)?;
        d.set_item("poly_eps", c.poly_eps)?;
        d.set_item("error_bound_per_column", c.error_bound_per_column.clone())?;
        d.set_item(
            "approximation_bound_per_column",
            c.approximation_bound_per_column.clone(),
        )?;
        d.set_item(
            "rounding_bound_per_column",
            c.rounding_bound_per_column.clone(),
        )?;
        d.set_item("f16_rounding", c.f16_rounding)?;
        d.set_item("schedule", format!("{:?}", c.schedule))?;
    }
    Ok(d)
}

/// The contiguous float32 data of a flat array, read in place (no copy): the Python layer hands
/// over only contiguous arrays. While the GIL is released other Python threads could write to
/// it, as with any NumPy function that releases the GIL.
fn contiguous<'a>(x: &'a PyReadonlyArray1<'_, f32>, name: &str) -> PyResult<&'a [f32]> {
    x.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

/// Query, key and value, read in place ([`contiguous`]).
fn inputs<'a>(
    q: &'a PyReadonlyArray1<'_, f32>,
    k: &'a PyReadonlyArray1<'_, f32>,
    v: &'a PyReadonlyArray1<'_, f32>,
) -> PyResult<(&'a [f32], &'a [f32], &'a [f32])> {
    Ok((
        contiguous(q, "query")?,
        contiguous(k, "key")?,
        contiguous(v, "value")?,
    ))
}

/// The caller's output array, written in place.
fn output<'a>(out: &'a mut PyReadwriteArray1<'_, f32>) -> PyResult<&'a mut [f32]> {
    out.as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be C-contiguous"))
}

/// The problem every binding describes by the same sizes: `[units, group, l, s, e, ev]`.
fn problem([units, group, l, s, e, ev]: [usize; 6], causal: bool, scale: f32) -> Problem {
    Problem {
        units,
        group,
        l,
        s,
        e,
        ev,
        causal,
        scale,
    }
}

/// Attention on flattened contiguous float32 arrays, read in place, into the flat float32
/// array `out`; returns the report dict.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, units, group, l, s, e, ev, causal, scale, method, eps, degree, check_finite, trusted=false, count_io=false, tensor_cores=None, f16_inputs=false, f16_storage=None, f16_rounded=false))]
#[allow(clippy::too_many_arguments)]
fn attention<'py>(
    py: Python<'py>,
    q: PyReadonlyArray1<'py, f32>,
    k: PyReadonlyArray1<'py, f32>,
    v: PyReadonlyArray1<'py, f32>,
    mut out: PyReadwriteArray1<'py, f32>,
    units: usize,
    group: usize,
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
    causal: bool,
    scale: f32,
    method: &str,
    eps: f64,
    degree: Option<usize>,
    check_finite: bool,
    trusted: bool,
    count_io: bool,
    tensor_cores: Option<bool>,
    f16_inputs: bool,
    f16_storage: Option<[PyReadonlyArray1<'py, u16>; 3]>,
    f16_rounded: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let method = parse_method(
        method,
        &[
            ("auto", Method::Auto),
            ("exact", Method::Exact),
            ("poly", Method::Poly),
        ],
    )?;
    let (q, k, v) = inputs(&q, &k, &v)?;
    let out = output(&mut out)?;
    let p = problem([units, group, l, s, e, ev], causal, scale);
    let popts = PolyOptions {
        eps,
        degree,
        check_finite,
        tensor_cores,
    };
    let opts = RunOptions { trusted, count_io };
    // The float16 bits, packed for f16 storage (in place where they already are the packed
    // words, else a copy made while holding the GIL).
    let halves = match &f16_storage {
        Some([a, b, c]) => {
            let xs = (a.as_slice()?, b.as_slice()?, c.as_slice()?);
            let packed = crate::exact::storage::F16Inputs::pack(&p, xs, f16_rounded);
            Some(packed.map_err(to_py)?)
        }
        None => None,
    };
    let report = detached(py, || {
        crate::attention_into(
            &p,
            (q, k, v),
            method,
            &popts,
            &opts,
            f16_inputs,
            halves.as_ref(),
            out,
        )
    })?;
    report_dict(py, &report)
}

/// Exact attention (f32 kernel) on flattened contiguous float32 arrays that also returns each
/// output row's log-sum-exp; returns (flat output, flat lse, report dict).
#[pyfunction]
#[pyo3(signature = (q, k, v, units, group, l, s, e, ev, causal, scale, count_io=false))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn exact_attention_lse<'py>(
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
    count_io: bool,
) -> PyResult<(
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyDict>,
)> {
    let (q, k, v) = inputs(&q, &k, &v)?;
    let p = problem([units, group, l, s, e, ev], causal, scale);
    let opts = RunOptions {
        trusted: false,
        count_io,
    };
    let (out, lse, report) = detached(py, || crate::exact_attention_lse(&p, q, k, v, &opts))?;
    Ok((
        PyArray1::from_vec(py, out),
        PyArray1::from_vec(py, lse),
        report_dict(py, &report)?,
    ))
}

/// Polynomial attention with the model's own kernel on flattened contiguous float32 arrays;
/// returns (flat output, flat state or None, report dict). See `approx_attn.poly_attention`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, units, group, l, s, e, ev, causal, scale, coeffs, normalize, log_gates=None, initial_state=None, return_state=false, count_io=false))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn poly_kernel_attention<'py>(
    py: Python<'py>,
    q: PyReadonlyArray1<'py, f32>,
    k: PyReadonlyArray1<'py, f32>,
    v: PyReadonlyArray1<'py, f32>,
    mut out: PyReadwriteArray1<'py, f32>,
    units: usize,
    group: usize,
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
    causal: bool,
    scale: f32,
    coeffs: Vec<f64>,
    normalize: bool,
    log_gates: Option<PyReadonlyArray1<'py, f32>>,
    initial_state: Option<PyReadonlyArray1<'py, f32>>,
    return_state: bool,
    count_io: bool,
) -> PyResult<(Option<Bound<'py, PyArray1<f32>>>, Bound<'py, PyDict>)> {
    let (q, k, v) = inputs(&q, &k, &v)?;
    let out = output(&mut out)?;
    let gates = log_gates.map(|g| g.as_array().iter().copied().collect::<Vec<f32>>());
    let state0 = initial_state.map(|x| x.as_array().iter().copied().collect::<Vec<f32>>());
    let p = problem([units, group, l, s, e, ev], causal, scale);
    let kernel = crate::poly::primitive::PolyKernel {
        coeffs: &coeffs,
        normalize,
        log_gates: gates.as_deref(),
        initial_state: state0.as_deref(),
        return_state,
    };
    let opts = RunOptions {
        trusted: false,
        count_io,
    };
    let start = std::time::Instant::now();
    let run = detached(py, || {
        p.check_output(out)?;
        let run = crate::poly::primitive::poly_kernel_attention(&p, (q, k, v), &kernel, &opts)?;
        crate::transfer::assign_slice(out, &run.out);
        Ok(run)
    })?;
    let (degree, rank) = (run.degree, run.rank);
    let (report, state) = run.into_report(start.elapsed().as_secs_f64());
    let d = report_dict(py, &report)?;
    d.set_item("degree", degree)?;
    d.set_item("rank", rank)?;
    let state = state.map(|st| PyArray1::from_vec(py, st));
    Ok((state, d))
}

/// Features of the polynomial kernel with these coefficients at head dimension `e` (the rows of
/// its recurrent state).
#[pyfunction]
fn poly_kernel_rank(e: usize, coeffs: Vec<f64>) -> PyResult<usize> {
    crate::poly::primitive::kernel_rank(e, &coeffs).map_err(to_py)
}

/// The words the plan for this problem would move; see `approx_attn.io_cost`.
#[pyfunction]
#[pyo3(signature = (units, group, l, s, e, ev, causal, method, degree=None, eps=None, beta=None, fast_memory_words=None, storage="float32"))]
#[allow(clippy::too_many_arguments)]
fn io_cost<'py>(
    py: Python<'py>,
    units: usize,
    group: usize,
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
    causal: bool,
    method: &str,
    degree: Option<usize>,
    eps: Option<f64>,
    beta: Option<f64>,
    fast_memory_words: Option<u64>,
    storage: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let method = parse_method(method, &[("exact", Method::Exact), ("poly", Method::Poly)])?;
    let storage = parse_storage(storage)?;
    let p = problem([units, group, l, s, e, ev], causal, 1.0);
    let est = detached(py, || {
        crate::io_cost(&p, method, degree, eps, beta, fast_memory_words, storage)
    })?;
    let d = PyDict::new(py);
    d.set_item("method", est.method)?;
    d.set_item("schedule", est.schedule.map(|s| format!("{s:?}")))?;
    d.set_item("degree", est.degree)?;
    d.set_item("rank", est.rank)?;
    d.set_item("fast_memory_words", est.fast_memory_words)?;
    d.set_item("storage", storage.name())?;
    let passes: Vec<(String, u64, u64)> = est
        .io
        .passes
        .iter()
        .map(|p| (p.name.to_string(), p.reads, p.writes))
        .collect();
    d.set_item("passes", passes)?;
    d.set_item("reads", est.io.reads())?;
    d.set_item("writes", est.io.writes())?;
    d.set_item("total", est.io.total())?;
    d.set_item("host_to_device", est.host_device.to_device)?;
    d.set_item("device_to_host", est.host_device.to_host)?;
    Ok(d)
}

fn parse_storage(storage: &str) -> PyResult<crate::exact::storage::Storage> {
    use crate::exact::storage::Storage;
    [Storage::F32, Storage::F16]
        .into_iter()
        .find(|s| s.name() == storage)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "storage must be 'float16' or 'float32', got '{storage}'"
            ))
        })
}

fn parse_method(method: &str, allowed: &[(&str, Method)]) -> PyResult<Method> {
    allowed
        .iter()
        .find(|(name, _)| *name == method)
        .map(|&(_, m)| m)
        .ok_or_else(|| {
            // The Python wrappers' wording: the allowed names as a tuple, the value as its repr.
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            PyValueError::new_err(format!(
                "method must be one of ('{}'), got '{method}'",
                names.join("', '")
            ))
        })
}

/// The reconstructed I/O lower bound in words; see `approx_attn.io_lower_bound`.
#[pyfunction]
#[pyo3(signature = (l, s, e, method, degree, fast_memory_words))]
fn io_lower_bound(
    l: usize,
    s: usize,
    e: usize,
    method: &str,
    degree: Option<usize>,
    fast_memory_words: u64,
) -> PyResult<f64> {
    let method = parse_method(method, &[("exact", Method::Exact), ("poly", Method::Poly)])?;
    crate::io_lower_bound(l, s, e, method, degree, fast_memory_words).map_err(to_py)
}

/// Closed forms in words (see `io::closed_form`): (exact_tiled, poly_a, poly_b, poly_materialized,
/// poly_lower_bound, exact_lower_bound). Sizes are finite, L and S >= 0, d, r and m > 0.
#[pyfunction]
fn io_closed_form(
    l: f64,
    s: f64,
    d: f64,
    r: f64,
    m: f64,
) -> PyResult<(f64, f64, f64, f64, f64, f64)> {
    use crate::io::closed_form as cf;
    let sizes = [
        ("l", l, 0.0),
        ("s", s, 0.0),
        ("d", d, 1.0),
        ("r", r, 1.0),
        ("m", m, 1.0),
    ];
    for (name, x, low) in sizes {
        if !(x.is_finite() && x >= low) {
            return Err(PyValueError::new_err(format!(
                "{name} must be a finite number >= {low}, got {x}"
            )));
        }
    }
    Ok((
        cf::exact_tiled(l, s, d, m),
        cf::poly_a(l, s, d),
        cf::poly_b(l, s, d, r, m),
        cf::poly_materialized(l.max(s), d, r, m),
        cf::poly_lower_bound(l, s, d, r, m),
        cf::exact_lower_bound(l, s, d, m),
    ))
}

/// C(e+g, g), the number of features of degree <= g in e variables.
#[pyfunction]
fn num_features(e: usize, g: usize) -> PyResult<u64> {
    match crate::poly::features::num_features(e, g) {
        u64::MAX => Err(to_py(Error::Overflow(format!(
            "C(e+g, g) for e={e}, g={g} is beyond 2^64 - 1"
        )))),
        r => Ok(r),
    }
}

/// (degree, coefficients, certified eps) of the best fit of exp on [-beta, beta].
#[pyfunction]
#[pyo3(signature = (beta, degree=None, eps=None))]
fn fit_polynomial(
    beta: f64,
    degree: Option<usize>,
    eps: Option<f64>,
) -> PyResult<(usize, Vec<f64>, f64)> {
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "beta must be a finite number >= 0, got {beta}"
        )));
    }
    let poly = match (degree, eps) {
        (Some(g), _) => {
            crate::api::check_forced_degree(g).map_err(to_py)?;
            crate::poly::fit::Poly::fit(beta, g)
        }
        (None, Some(eps)) => crate::poly::fit::choose_degree(beta, eps, crate::MAX_DEGREE)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "no degree <= {} certifies eps={eps} at beta={beta}",
                    crate::MAX_DEGREE
                ))
            })?,
        (None, None) => return Err(PyValueError::new_err("give degree= or eps=")),
    };
    Ok((poly.degree, poly.coeffs.clone(), poly.certified_eps))
}

/// The polynomial the float32 kernels would run at `beta` for head dimension `e` (`degree`
/// forced, else the least certifying `eps`), refused with the attention call's errors; returns
/// (degree, coefficients, certified relative error).
#[pyfunction]
#[pyo3(signature = (beta, e, eps, degree=None))]
fn certified_polynomial(
    beta: f64,
    e: usize,
    eps: f64,
    degree: Option<usize>,
) -> PyResult<(usize, Vec<f64>, f64)> {
    let poly = crate::poly::certificate::certified_f32_poly(beta, e, eps, degree).map_err(to_py)?;
    Ok((poly.degree, poly.coeffs.clone(), poly.certified_eps))
}

#[pyfunction]
fn device_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let gpu = detached(py, device::gpu)?;
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
    d.set_item("coop_f16", i.coop_f16)?;
    d.set_item("f16_storage", i.f16_storage)?;
    d.set_item("subgroup_size", i.subgroup_size)?;
    d.set_item("cached_pipelines", gpu.cached_pipelines())?;
    d.set_item("max_cached_pipelines", device::MAX_CACHED_PIPELINES)?;
    Ok(d)
}

/// Every adapter wgpu sees: (name, backend, device type).
#[pyfunction]
fn list_adapters(py: Python<'_>) -> PyResult<Vec<(String, String, String)>> {
    detached(py, device::list_adapters)
}

/// Frees the host memory kept between calls (the pooled staging buffers of the current device)
/// and its compiled pipelines; returns the staging buffers' bytes.
#[pyfunction]
fn empty_cache(py: Python<'_>) -> PyResult<u64> {
    let staging = match device::current_gpu() {
        Some(gpu) => detached(py, || {
            gpu.clear_pipelines();
            crate::transfer::release_staging(&gpu)
        })?,
        None => 0,
    };
    Ok(staging)
}

/// The slices of a conversion's source and (C-contiguous) destination, of one length.
fn conversion_slices<'a, A: numpy::Element, B: numpy::Element>(
    src: &'a PyReadonlyArray1<'_, A>,
    dst: &'a mut PyReadwriteArray1<'_, B>,
    (from, to): (&str, &str),
) -> PyResult<(&'a [A], &'a mut [B])> {
    let src = src.as_slice()?;
    let dst = dst
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("dst must be C-contiguous"))?;
    if src.len() != dst.len() {
        return Err(PyValueError::new_err(format!(
            "{from} source has {} elements, {to} destination {}",
            src.len(),
            dst.len()
        )));
    }
    Ok((src, dst))
}

/// Writes the float32 values of the float16 bits `src` into `dst` (exact, as NumPy's cast, on
/// several threads); returns how many are NaN or Inf.
#[pyfunction]
fn _f16_to_f32(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u16>,
    mut dst: PyReadwriteArray1<'_, f32>,
) -> PyResult<usize> {
    let (src, dst) = conversion_slices(&src, &mut dst, ("float16", "float32"))?;
    detached(py, || Ok(crate::half::f16_to_f32(src, dst)))
}

/// How many of the float16 bits `src` are NaN or Inf (on several threads).
#[pyfunction]
fn _f16_nonfinite(py: Python<'_>, src: PyReadonlyArray1<'_, u16>) -> PyResult<usize> {
    let src = src.as_slice()?;
    detached(py, || Ok(crate::half::f16_nonfinite(src)))
}

/// Writes the float16 bits nearest the float32 values `src` into `dst` (ties to even, as
/// NumPy's cast, on several threads).
#[pyfunction]
fn _f32_to_f16(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, f32>,
    mut dst: PyReadwriteArray1<'_, u16>,
) -> PyResult<()> {
    let (src, dst) = conversion_slices(&src, &mut dst, ("float32", "float16"))?;
    detached(py, || {
        crate::half::f32_to_f16(src, dst);
        Ok(())
    })
}

/// Destroys the current device, as a driver reset would; the next call must create a new one.
#[pyfunction]
fn _destroy_device(py: Python<'_>) -> PyResult<()> {
    let gpu = detached(py, device::gpu)?;
    gpu.device.destroy();
    Ok(())
}

/// Panics inside the binding's guard, for the test that no panic reaches Python as one.
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<()> {
    detached(py, || -> Result<(), Error> {
        panic!("a panic raised on purpose")
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::interrupt::set_check(python_signal_raised);
    m.add_function(wrap_pyfunction!(attention, m)?)?;
    m.add_function(wrap_pyfunction!(exact_attention_lse, m)?)?;
    m.add_function(wrap_pyfunction!(poly_kernel_attention, m)?)?;
    m.add_function(wrap_pyfunction!(poly_kernel_rank, m)?)?;
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    m.add_function(wrap_pyfunction!(list_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(io_cost, m)?)?;
    m.add_function(wrap_pyfunction!(io_closed_form, m)?)?;
    m.add_function(wrap_pyfunction!(io_lower_bound, m)?)?;
    m.add_function(wrap_pyfunction!(num_features, m)?)?;
    m.add_function(wrap_pyfunction!(fit_polynomial, m)?)?;
    m.add_function(wrap_pyfunction!(certified_polynomial, m)?)?;
    m.add_function(wrap_pyfunction!(_destroy_device, m)?)?;
    m.add_function(wrap_pyfunction!(_f16_to_f32, m)?)?;
    m.add_function(wrap_pyfunction!(_f16_nonfinite, m)?)?;
    m.add_function(wrap_pyfunction!(_f32_to_f16, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    m.add_function(wrap_pyfunction!(empty_cache, m)?)?;
    m.add_class::<DeviceState>()?;
    m.add("NoDeviceError", m.py().get_type::<NoDeviceError>())?;
    m.add("DeviceError", m.py().get_type::<DeviceError>())?;
    Ok(())
}

/// A polynomial-attention state held in GPU memory between decoding steps
/// (`crate::poly::decode`); `approx_attn.PolyState` keeps one after its first step.
#[pyclass(module = "approx_attn._core")]
struct DeviceState {
    inner: crate::poly::decode::DeviceState,
}

#[pymethods]
impl DeviceState {
    /// Uploads a flat float32 state (units x rank x (ev + 1)) for the kernel `coeffs`, `scale`;
    /// `unrolled` picks the step kernel's form (None: by the adapter; tests run both).
    #[new]
    #[pyo3(signature = (state, units, group, e, ev, coeffs, scale, normalize, unrolled=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        state: PyReadonlyArray1<'_, f32>,
        units: usize,
        group: usize,
        e: usize,
        ev: usize,
        coeffs: Vec<f64>,
        scale: f64,
        normalize: bool,
        unrolled: Option<bool>,
    ) -> PyResult<Self> {
        let state = contiguous(&state, "state")?;
        let inner = detached(py, || {
            crate::poly::decode::DeviceState::new(
                state, units, group, e, ev, &coeffs, scale, normalize, unrolled,
            )
        })?;
        Ok(DeviceState { inner })
    }

    /// Consumes n tokens (flat q (heads, n, e), k (units, n, e), v (units, n, ev), log gates
    /// (units, n) or None); returns (flat outputs (heads, n, ev), whether the state took them:
    /// false where an output is not finite, the state then unchanged).
    #[pyo3(signature = (q, k, v, n, log_gates=None))]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        q: PyReadonlyArray1<'py, f32>,
        k: PyReadonlyArray1<'py, f32>,
        v: PyReadonlyArray1<'py, f32>,
        n: usize,
        log_gates: Option<PyReadonlyArray1<'py, f32>>,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, bool)> {
        let (q, k, v) = (
            contiguous(&q, "query")?,
            contiguous(&k, "key")?,
            contiguous(&v, "value")?,
        );
        let gates = match &log_gates {
            Some(g) => Some(contiguous(g, "log_gates")?),
            None => None,
        };
        let inner = &mut self.inner;
        let (out, took) = detached(py, || inner.step((q, k, v), gates, n))?;
        Ok((PyArray1::from_vec(py, out), took))
    }

    /// A flat float32 copy of the state in host memory.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let inner = &self.inner;
        let st = detached(py, || inner.to_host())?;
        Ok(PyArray1::from_vec(py, st))
    }

    /// Most tokens one step takes.
    #[classattr]
    fn max_step_tokens() -> usize {
        crate::poly::decode::MAX_STEP_TOKENS
    }
}
