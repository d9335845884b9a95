//! Kernel families: WGSL generation from a plan's tiles, pipelines and dispatch.

pub mod exact;
pub mod poly;
pub mod poly_causal;

use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use crate::device::{Gpu, StagingPool};
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
    // The pooled host staging buffers are host memory kept between calls, not this call's GPU
    // memory.
    let staging = gpu.upload_pool.live_bytes.load(Ordering::Relaxed)
        + gpu.readback_pool.live_bytes.load(Ordering::Relaxed);
    gpu.device
        .generate_allocator_report()
        .map(|r| r.total_allocated_bytes.saturating_sub(staging))
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
    let read = PooledReadback::new(gpu, bytes);
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &read, 0, bytes);
    gpu.queue.submit([enc.finish()]);
    read_mapped(gpu, &read, bytes, |b| {
        let mut out = Vec::new();
        assign_parallel(&mut out, bytemuck::cast_slice::<u8, f32>(b));
        out
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

/// Transfers from this size on go through the pooled staging buffers of [`upload`] and
/// [`PooledReadback`]; smaller ones through wgpu's own staging, which is cheap at that size.
const POOLED_BYTES: u64 = 1 << 20;
/// Idle staging buffers kept per direction (the largest ones): an attention call uploads Q, K
/// and V and reads one output back.
const POOLED_UPLOADS: usize = 4;
const POOLED_READBACKS: usize = 2;

impl StagingPool {
    /// The smallest idle buffer that holds `bytes`, else a new one from `create`.
    fn take(&self, bytes: u64, create: impl FnOnce() -> wgpu::Buffer) -> wgpu::Buffer {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..idle.len())
            .filter(|&i| idle[i].size() >= bytes)
            .min_by_key(|&i| idle[i].size());
        if let Some(i) = best {
            return idle.swap_remove(i);
        }
        drop(idle);
        let buf = create();
        self.live_bytes.fetch_add(buf.size(), Ordering::Relaxed);
        buf
    }

    /// Makes `buf` idle again; the pool keeps its `keep` largest idle buffers.
    fn give_back(&self, buf: wgpu::Buffer, keep: usize) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(buf);
        if idle.len() > keep {
            if let Some(i) = (0..idle.len()).min_by_key(|&i| idle[i].size()) {
                let evicted = idle.swap_remove(i);
                self.forget(&evicted);
            }
        }
    }

    /// Drops every idle buffer; returns their bytes.
    fn clear(&self) -> u64 {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        idle.iter()
            .map(|b| {
                self.forget(b);
                b.size()
            })
            .sum()
    }

    /// `buf` (created by this pool) is dropped instead of given back.
    fn forget(&self, buf: &wgpu::Buffer) {
        self.live_bytes.fetch_sub(buf.size(), Ordering::Relaxed);
    }
}

/// Copies `data` into `dst` from offset 0. Large data goes through host-visible staging buffers
/// that are kept between calls, mapped for writing again once their copy is done, instead of
/// `Queue::write_buffer`, which allocates fresh staging memory for every write: on the H100 that
/// allocation of pinned host memory cost more than the copy itself.
pub(crate) fn upload(gpu: &Gpu, dst: &wgpu::Buffer, data: &[u8]) {
    let bytes = data.len() as u64;
    if bytes < POOLED_BYTES || bytes % wgpu::COPY_BUFFER_ALIGNMENT != 0 {
        gpu.queue.write_buffer(dst, 0, data);
        return;
    }
    let staging = gpu.upload_pool.take(bytes, || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload staging"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        })
    });
    match staging.slice(..bytes).get_mapped_range_mut() {
        Ok(mut view) => copy_to_mapped(&mut view, data),
        Err(_) => {
            // Not mapped after all: wgpu's own staging instead (the buffer is dropped).
            gpu.upload_pool.forget(&staging);
            gpu.queue.write_buffer(dst, 0, data);
            return;
        }
    }
    staging.unmap();
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&staging, 0, dst, 0, bytes);
    gpu.queue.submit([enc.finish()]);
    // Mapped again once the copy is done (at a later poll), then idle in the pool.
    let pool = gpu.upload_pool.clone();
    let buf = staging.clone();
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Write, move |r| match r {
            Ok(()) => pool.give_back(buf, POOLED_UPLOADS),
            Err(_) => pool.forget(&buf),
        });
}

/// Frees the pooled staging buffers of `gpu` once its queue is idle; returns their bytes.
pub fn release_staging(gpu: &Gpu) -> Result<u64, Error> {
    let _guard = gpu.exclusive();
    gpu.wait()?; // uploads still in flight come back to the pool first
    Ok(gpu.upload_pool.clear() + gpu.readback_pool.clear())
}

/// A MAP_READ buffer of at least `bytes` bytes; large ones come from a pool kept between calls
/// (see [`upload`]) and go back to it when dropped.
pub(crate) struct PooledReadback<'a> {
    gpu: &'a Gpu,
    buf: Option<wgpu::Buffer>,
}

impl<'a> PooledReadback<'a> {
    pub(crate) fn new(gpu: &'a Gpu, bytes: u64) -> Self {
        let buf = if bytes >= POOLED_BYTES {
            gpu.readback_pool
                .take(bytes, || readback_buffer(gpu, bytes))
        } else {
            readback_buffer(gpu, bytes)
        };
        PooledReadback {
            gpu,
            buf: Some(buf),
        }
    }
}

impl std::ops::Deref for PooledReadback<'_> {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        self.buf.as_ref().expect("present until dropped")
    }
}

impl Drop for PooledReadback<'_> {
    fn drop(&mut self) {
        // `read_mapped` leaves it unmapped, also where it fails.
        if let Some(buf) = self.buf.take() {
            if buf.size() >= POOLED_BYTES {
                self.gpu.readback_pool.give_back(buf, POOLED_READBACKS);
            }
        }
    }
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
    let out = buf
        .slice(..bytes.max(4))
        .get_mapped_range()
        .map(|view| read(&view[..bytes as usize]));
    buf.unmap();
    out.map_err(|e| Error::Gpu(format!("mapping results failed: {e}")))
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
        include_str!("poly_causal.rs"),
        exact::TEMPLATE,
        poly::PREPASS,
        poly::PASS1,
        poly::REDUCE,
        poly::PASS2,
        poly::COOP_PASS1,
        poly::COOP_PASS2,
        poly::COOP_PACK,
        poly_causal::SCAN,
        poly_causal::DIAG,
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

/// Copies of at least this many bytes are split over threads: one core's memcpy (a few GB/s)
/// is slower than host memory, and inputs and outputs are copied from NumPy into staging
/// memory and back at every call.
const PARALLEL_COPY_BYTES: usize = 32 << 20;

fn copy_threads(bytes: usize) -> usize {
    if bytes < PARALLEL_COPY_BYTES {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Writes `src` into a mapped staging view of the same length, on several threads for large
/// data.
fn copy_to_mapped(view: &mut wgpu::BufferViewMut, src: &[u8]) {
    /// A part of the mapped range handed to one thread (`WriteOnly<[u8]>` is not `Send`).
    struct Part(NonNull<[u8]>);
    // SAFETY: the parts are disjoint and only written while `view` is borrowed, by one thread
    // each (see below).
    unsafe impl Send for Part {}

    let threads = copy_threads(src.len());
    if threads == 1 {
        view.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(threads);
    let mut rest = view.slice(..);
    std::thread::scope(|scope| {
        for s in src.chunks(chunk) {
            let (mut d, tail) = rest.split_at(s.len());
            rest = tail;
            let part = Part(d.as_raw_ptr());
            scope.spawn(move || {
                let part = part;
                // SAFETY: `part` is a mapped range of exactly `s.len()` bytes, valid for writes
                // for as long as `view` is borrowed (the whole scope), written by this thread
                // only; `s` is host memory that cannot overlap it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        s.as_ptr(),
                        part.0.as_ptr().cast::<u8>(),
                        s.len(),
                    );
                }
            });
        }
    });
}

/// Replaces the contents of `dst` by `src` (keeping `dst`'s memory where it is large enough),
/// on several threads for large slices.
pub fn assign_parallel<T: Copy + Send + Sync>(dst: &mut Vec<T>, src: &[T]) {
    dst.clear();
    let threads = copy_threads(std::mem::size_of_val(src));
    if threads == 1 {
        // No thread for small copies (most calls' small readbacks and inputs).
        dst.extend_from_slice(src);
        return;
    }
    dst.reserve(src.len());
    let chunk = src.len().div_ceil(threads);
    let spare = &mut dst.spare_capacity_mut()[..src.len()];
    std::thread::scope(|scope| {
        for (d, s) in spare.chunks_mut(chunk).zip(src.chunks(chunk)) {
            scope.spawn(move || {
                for (d, s) in d.iter_mut().zip(s) {
                    d.write(*s);
                }
            });
        }
    });
    // SAFETY: the first src.len() elements of the spare capacity were all written above.
    unsafe { dst.set_len(src.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_copies_everything_in_order() {
        // Above and below the threshold, lengths that do not divide evenly among threads.
        for len in [0usize, 1, 1000, (PARALLEL_COPY_BYTES / 4) * 3 + 7] {
            let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let mut grown = vec![5.0f32; 3];
            assign_parallel(&mut grown, &src);
            assert_eq!(grown, src);
            let mut shrunk = vec![5.0f32; len + 10];
            assign_parallel(&mut shrunk, &src);
            assert_eq!(shrunk, src);
        }
    }

    #[test]
    fn pooled_uploads_and_readbacks_round_trip() {
        // Large enough for the pooled staging buffers and the threaded copies; the second round
        // reuses the buffers of the first.
        let gpu = crate::device::gpu().unwrap();
        let words = PARALLEL_COPY_BYTES / 4 * 2 + 5;
        let buf = storage_buffer(&gpu, words, "round trip");
        for round in 0..2u32 {
            let data: Vec<f32> = (0..words)
                .map(|i| (i as f32) + round as f32 * 0.5)
                .collect();
            upload(&gpu, &buf, bytemuck::cast_slice(&data));
            assert_eq!(read_f32(&gpu, &buf, words).unwrap(), data, "round {round}");
        }
        assert!(gpu.upload_pool.live_bytes.load(Ordering::Relaxed) >= (words * 4) as u64);
        assert!(gpu.readback_pool.live_bytes.load(Ordering::Relaxed) >= (words * 4) as u64);
    }
}
