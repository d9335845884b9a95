//! Kernel families: WGSL generation from a plan's tiles, pipelines and dispatch.

pub mod exact;
pub mod poly;

use std::sync::mpsc;

use crate::device::Gpu;
use crate::error::Error;

/// What a run measured besides its output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunStats {
    /// Words read from / written to storage buffers, counted by the shaders with atomics
    /// (only when I/O counting is on).
    pub io_words_counted: Option<(u64, u64)>,
    /// Sum of the kernels' GPU time from timestamp queries, where the adapter has them.
    pub kernel_s: Option<f64>,
    pub dispatches: usize,
    /// GPU seconds per pass name (timestamps), summed over dispatches.
    pub pass_s: Vec<(&'static str, f64)>,
    /// Most bytes wgpu's memory allocator held for the device after any dispatch of the call,
    /// where the backend reports it (see [`allocated_bytes`]).
    pub gpu_allocated_bytes: Option<u64>,
}

impl RunStats {
    /// The stats of one dispatch of pass `name`, with the allocator's current total: taken right
    /// after the dispatch, while the caller still holds every buffer of the pass.
    pub fn dispatch(
        gpu: &Gpu,
        name: &'static str,
        counted: Option<(u64, u64)>,
        kernel_s: Option<f64>,
    ) -> Self {
        RunStats {
            io_words_counted: counted,
            kernel_s,
            dispatches: 1,
            pass_s: kernel_s.map(|t| vec![(name, t)]).unwrap_or_default(),
            gpu_allocated_bytes: allocated_bytes(gpu),
        }
    }

    pub fn absorb(&mut self, other: &RunStats) {
        self.dispatches += other.dispatches;
        for (name, t) in &other.pass_s {
            match self.pass_s.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) => *acc += t,
                None => self.pass_s.push((name, *t)),
            }
        }
        self.kernel_s = match (self.kernel_s, other.kernel_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.gpu_allocated_bytes = match (self.gpu_allocated_bytes, other.gpu_allocated_bytes) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.io_words_counted = match (self.io_words_counted, other.io_words_counted) {
            (Some(a), Some(b)) => Some((a.0 + b.0, a.1 + b.1)),
            (a, b) => a.or(b),
        };
    }
}

/// Options every kernel family takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Compile the shaders with wgpu's bounds checks off (benchmarks only).
    pub trusted: bool,
    /// Compile the I/O-counting variant of the shaders.
    pub count_io: bool,
}

/// Bytes of all live allocations of wgpu's memory allocator for this device (buffers, ours and
/// any a finished call has not released yet, and query sets), where the backend sub-allocates
/// and reports it (Vulkan and DX12 through gpu-allocator); None elsewhere.
pub fn allocated_bytes(gpu: &Gpu) -> Option<u64> {
    gpu.device
        .generate_allocator_report()
        .map(|r| r.total_allocated_bytes)
}

pub fn storage_buffer(gpu: &Gpu, words: usize, label: &str) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (words.max(1) * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

pub fn uniform_buffer(gpu: &Gpu, bytes: &[u8]) -> wgpu::Buffer {
    let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("params"),
        size: bytes.len() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    gpu.queue.write_buffer(&buf, 0, bytes);
    buf
}

/// Copies `words` f32 of a storage buffer back to the host.
pub fn read_f32(gpu: &Gpu, buf: &wgpu::Buffer, words: usize) -> Result<Vec<f32>, Error> {
    let bytes = (words * 4) as u64;
    let read = readback_buffer(gpu, bytes);
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &read, 0, bytes);
    gpu.queue.submit([enc.finish()]);
    read_mapped(gpu, &read, bytes, |b| {
        bytemuck::cast_slice::<u8, f32>(b).to_vec()
    })
}

/// A MAP_READ buffer of `bytes` bytes.
pub(crate) fn readback_buffer(gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Maps a readback buffer after the queue finished and hands its bytes to `read`.
pub(crate) fn read_mapped<T>(
    gpu: &Gpu,
    buf: &wgpu::Buffer,
    bytes: u64,
    read: impl FnOnce(&[u8]) -> T,
) -> Result<T, Error> {
    let (tx, rx) = mpsc::channel();
    buf.slice(..bytes.max(4))
        .map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
    gpu.wait()?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Gpu(format!("reading results back failed: {e}"))),
        Err(_) => {
            return Err(Error::DeviceLost(
                "the GPU never returned the results".into(),
            ))
        }
    }
    let out = {
        let view = buf
            .slice(..bytes.max(4))
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("mapping results failed: {e}")))?;
        read(&view[..bytes as usize])
    };
    buf.unmap();
    Ok(out)
}

/// GPU time of one compute pass, from timestamps written at its beginning and end (inside the
/// pass, so uploads queued before it are not counted), where the adapter supports them.
pub(crate) struct Timer {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
}

impl Timer {
    pub fn new(gpu: &Gpu) -> Option<Timer> {
        if !gpu
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            return None;
        }
        let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(Timer {
            set,
            resolve,
            readback: readback_buffer(gpu, 16),
            period_ns: f64::from(gpu.queue.get_timestamp_period()),
        })
    }

    /// The descriptor of the timed compute pass.
    pub fn pass(&self) -> wgpu::ComputePassDescriptor<'_> {
        wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
        }
    }

    /// After the pass: copies the timestamps out for [`Timer::seconds`].
    pub fn stop(&self, enc: &mut wgpu::CommandEncoder) {
        enc.resolve_query_set(&self.set, 0..2, &self.resolve, 0);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, 16);
    }

    /// Seconds between start and stop (after the submission finished).
    pub fn seconds(&self, gpu: &Gpu) -> Result<f64, Error> {
        read_mapped(gpu, &self.readback, 16, |b| {
            let t: &[u64] = bytemuck::cast_slice(b);
            t[1].saturating_sub(t[0]) as f64 * self.period_ns * 1e-9
        })
    }
}

/// FNV-1a hash of every shader template and of the Rust that generates WGSL from them, so
/// cached measurements (tuned tiles, rates) go stale with the kernels, not only with templates.
pub fn shader_fingerprint() -> u64 {
    [
        include_str!("mod.rs"),
        include_str!("exact.rs"),
        include_str!("poly.rs"),
        exact::TEMPLATE,
        poly::PREPASS,
        poly::PASS1,
        poly::REDUCE,
        poly::PASS2,
        poly::COOP_PASS1,
        poly::COOP_PASS2,
        poly::COOP_PACK,
    ]
    .iter()
    .flat_map(|t| t.bytes())
    .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Replaces every `{{NAME}}` slot of a WGSL template.
pub(crate) fn fill_template(template: &str, slots: &[(&str, String)]) -> String {
    let mut s = template.to_string();
    for (name, value) in slots {
        s = s.replace(&format!("{{{{{name}}}}}"), value);
    }
    debug_assert!(!s.contains("{{"), "unfilled slot in shader template");
    s
}

/// A tile element of `lanes` floats (1 or 4) in WGSL: its type, and the suffixes that pick its
/// floats in order ("" for a scalar).
pub(crate) fn wgsl_element(lanes: usize) -> (&'static str, &'static [&'static str]) {
    if lanes == 4 {
        ("vec4<f32>", &[".x", ".y", ".z", ".w"])
    } else {
        ("f32", &[""])
    }
}

/// The I/O counter's declaration and the per-thread add, or nothing when counting is off.
pub(crate) fn io_counter_slots(count_io: bool, binding: u32) -> [(&'static str, String); 2] {
    if count_io {
        [
            (
                "IO_COUNTER_DECL",
                format!(
                    "@group(0) @binding({binding}) var<storage, read_write> io_words: array<atomic<u32>, 2>;"
                ),
            ),
            (
                "IO_COUNTER_ADD",
                "    atomicAdd(&io_words[0], words_read);\n    atomicAdd(&io_words[1], words_written);"
                    .to_string(),
            ),
        ]
    } else {
        [
            ("IO_COUNTER_DECL", String::new()),
            ("IO_COUNTER_ADD", String::new()),
        ]
    }
}

/// Most steps a loop of constant trip count is written out into (one block per step).
pub(crate) const MAX_UNROLLED_STEPS: usize = 32;

/// A loop over `i` in `0..steps`, `steps` known when the WGSL is generated: written out step by
/// step with `i` a constant up to [`MAX_UNROLLED_STEPS`], a constant-trip loop beyond. NVIDIA's
/// Vulkan compiler did not unroll such loops itself (H100: poly pass 2 at E = 128 took 49 instead
/// of 66 ms written out).
pub(crate) fn constant_loop(
    indent: &str,
    i: &str,
    (name, steps): (&str, usize),
    body: &str,
) -> String {
    let body = body.trim_end();
    if steps <= MAX_UNROLLED_STEPS {
        (0..steps)
            .map(|k| format!("{indent}{{\n{indent}    let {i} = {k}u;\n{body}\n{indent}}}"))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        format!("{indent}for (var {i} = 0u; {i} < {name}; {i}++) {{\n{body}\n{indent}}}")
    }
}
