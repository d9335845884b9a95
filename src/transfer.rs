//! Host <-> GPU: storage and uniform buffers, the staging pool, uploads, pooled readbacks, and the
//! slicing (gather) of inputs into dispatch chunks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use crate::device::{Gpu, StagingPool};
use crate::error::Error;

pub(crate) use crate::traffic::{HostStage, TrafficCount};

/// Runs `work`, adding its wall-clock time to `stage` of `gpu`'s counters.
pub(crate) fn timed<T>(gpu: &Gpu, stage: HostStage, work: impl FnOnce() -> T) -> T {
    gpu.traffic.timed(stage, work)
}

fn count_to_device(gpu: &Gpu, bytes: usize) {
    gpu.traffic
        .to_device_bytes
        .fetch_add(bytes as u64, Ordering::Relaxed);
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

/// A storage buffer holding `data` (whole f32/u32 words).
pub fn storage_buffer_with(gpu: &Gpu, data: &[u8], label: &str) -> wgpu::Buffer {
    let buf = storage_buffer(gpu, data.len() / 4, label);
    count_to_device(gpu, data.len());
    gpu.queue.write_buffer(&buf, 0, data);
    buf
}

pub fn uniform_buffer(gpu: &Gpu, bytes: &[u8]) -> wgpu::Buffer {
    let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("params"),
        size: bytes.len() as u64,
        // Bound as uniform or, where the device binds parameters as storage, read-only storage.
        usage: wgpu::BufferUsages::UNIFORM
            | wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    count_to_device(gpu, bytes.len());
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
    upload_parts(gpu, dst, &[Part::copy(data)]);
}

/// [`upload`] of the concatenation of `parts`, each copied straight into the staging memory.
/// At most [`POOLED_UPLOADS`] copies are in flight: a further one waits for the oldest to finish
/// (the device keeps running the work submitted after it), so the staging memory stays bounded
/// however far the host runs ahead of the device.
pub(crate) fn upload_parts(gpu: &Gpu, dst: &wgpu::Buffer, parts: &[Part<'_>]) {
    let len: usize = parts.iter().map(|p| p.bytes.len()).sum();
    let bytes = len as u64;
    count_to_device(gpu, len);
    let pooled = bytes >= POOLED_BYTES && bytes % wgpu::COPY_BUFFER_ALIGNMENT == 0;
    if pooled {
        loop {
            let oldest = {
                let mut in_flight = lock(&gpu.upload_pool.in_flight);
                if in_flight.len() < POOLED_UPLOADS {
                    break;
                }
                in_flight.pop_front()
            };
            // An error here (device lost, Ctrl-C) shows at the call's next wait.
            if let Some(index) = oldest {
                gpu.wait_for_quietly(index);
            }
        }
    }
    let staging = timed(gpu, HostStage::Upload, || {
        let concat = || {
            let mut all = Vec::with_capacity(len);
            parts.iter().for_each(|p| p.append_to(&mut all));
            all
        };
        if !pooled {
            gpu.queue.write_buffer(dst, 0, &concat());
            return None;
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
            Ok(mut view) => {
                let mut rest = view.slice(..);
                for part in parts {
                    let (d, tail) = rest.split_at(part.bytes.len());
                    rest = tail;
                    copy_to_mapped(d, part);
                }
            }
            Err(_) => {
                // Not mapped after all: wgpu's own staging instead (the buffer is dropped).
                gpu.upload_pool.forget(&staging);
                gpu.queue.write_buffer(dst, 0, &concat());
                return None;
            }
        }
        staging.unmap();
        Some(staging)
    });
    let Some(staging) = staging else { return };
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&staging, 0, dst, 0, bytes);
    let index = submit(gpu, enc);
    lock(&gpu.upload_pool.in_flight).push_back(index);
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

/// Submits `enc`, timed as [`HostStage::Submit`] (a driver may block there while the device
/// is busy).
pub(crate) fn submit(gpu: &Gpu, enc: wgpu::CommandEncoder) -> wgpu::SubmissionIndex {
    let commands = enc.finish();
    timed(gpu, HostStage::Submit, || gpu.queue.submit([commands]))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Uploads the rows of `rows` into `dst` (one slice of an input), without a host copy first.
pub(crate) fn upload_rows(gpu: &Gpu, dst: &wgpu::Buffer, rows: &Rows<'_>) {
    upload_rows_mapped(gpu, dst, rows, None);
}

/// [`upload_rows`] with the rows of each unit (matrix) mapped by `map` on the way.
fn upload_rows_mapped(gpu: &Gpu, dst: &wgpu::Buffer, rows: &Rows<'_>, map: Option<&dyn RowMap>) {
    gpu.traffic.input_slices.fetch_add(1, Ordering::Relaxed);
    let parts: Vec<Part<'_>> = rows
        .parts()
        .zip(rows.h0..)
        .map(|(x, unit)| Part {
            bytes: bytemuck::cast_slice(x),
            map: map.map(|m| (m, unit)),
        })
        .collect();
    upload_parts(gpu, dst, &parts);
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
    finish_mapped(gpu, buf, bytes, rx.recv(), read)
}

/// The end of every readback: the outcome of its mapping (`got`; `Err` where the callback never
/// came), then the first `bytes` of `buf` handed to `read`; leaves `buf` unmapped.
pub(crate) fn finish_mapped<T>(
    gpu: &Gpu,
    buf: &wgpu::Buffer,
    bytes: u64,
    got: Result<Result<(), wgpu::BufferAsyncError>, mpsc::RecvError>,
    read: impl FnOnce(&[u8]) -> T,
) -> Result<T, Error> {
    match got {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Gpu(format!("reading results back failed: {e}"))),
        Err(_) => {
            return Err(Error::DeviceLost(
                "the GPU never returned the results".into(),
            ))
        }
    }
    gpu.traffic.count_to_host(bytes);
    let out = buf
        .slice(..bytes.max(4))
        .get_mapped_range()
        .map(|view| timed(gpu, HostStage::Readback, || read(&view[..bytes as usize])));
    buf.unmap();
    out.map_err(|e| Error::Gpu(format!("mapping results failed: {e}")))
}

/// Copies of at least this many bytes are split over threads: one core's memcpy (a few GB/s)
/// is slower than host memory, and inputs and outputs are copied from NumPy into staging
/// memory and back at every call.
const PARALLEL_COPY_BYTES: usize = 32 << 20;

pub(crate) fn copy_threads(bytes: usize) -> usize {
    crate::parallel::threads_for(bytes, PARALLEL_COPY_BYTES)
}

/// A map of an input's rows applied while a slice of it is copied to the device (the value map
/// of the poly passes): no mapped host copy of the whole input.
pub(crate) trait RowMap: Sync + Send {
    /// Row width.
    fn width(&self) -> usize;
    /// Writes the map of `src`, whole rows of `unit`, into `dst` (the same length).
    fn map_rows(&self, unit: usize, src: &[f32], dst: &mut [f32]);
}

/// One piece of an upload: bytes copied as they are, or rows of one unit of an f32 input mapped
/// by a [`RowMap`].
pub(crate) struct Part<'a> {
    bytes: &'a [u8],
    map: Option<(&'a dyn RowMap, usize)>,
}

impl<'a> Part<'a> {
    pub(crate) fn copy(bytes: &'a [u8]) -> Self {
        Part { bytes, map: None }
    }

    /// Into a host vector (small uploads).
    fn append_to(&self, out: &mut Vec<u8>) {
        match self.map {
            None => out.extend_from_slice(self.bytes),
            Some((m, unit)) => {
                let mut mapped = vec![0f32; self.bytes.len() / 4];
                m.map_rows(unit, bytemuck::cast_slice(self.bytes), &mut mapped);
                out.extend_from_slice(bytemuck::cast_slice(&mapped));
            }
        }
    }
}

/// Writes `src` into a mapped staging view of the same length, on several threads for large
/// data.
fn copy_to_mapped(view: wgpu::WriteOnly<'_, [u8]>, src: &Part<'_>) {
    /// A part of the mapped range handed to one thread (`WriteOnly<[u8]>` is not `Send`).
    struct Dst(NonNull<[u8]>);
    // SAFETY: the parts are disjoint and only written while `view` is borrowed, by one thread
    // each (see below).
    unsafe impl Send for Dst {}

    let bytes = src.bytes;
    let threads = copy_threads(bytes.len());
    // Whole rows per thread where mapped.
    let row = src.map.map_or(1, |(m, _)| 4 * m.width().max(1));
    let chunk = bytes.len().div_ceil(threads).div_ceil(row).max(1) * row;
    let write = move |d: Dst, s: &[u8]| {
        match src.map {
            // SAFETY: `d` is a mapped range of exactly `s.len()` bytes, valid for writes for as
            // long as `view` is borrowed (the whole scope), written by this thread only; `s` is
            // host memory that cannot overlap it.
            None => unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), d.0.as_ptr().cast::<u8>(), s.len());
            },
            Some((m, unit)) => {
                // SAFETY: as above; staging memory is 4-byte aligned (mapped offsets are
                // multiples of 4 and every part holds whole f32 words) and only written.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(d.0.as_ptr().cast::<f32>(), s.len() / 4)
                };
                m.map_rows(unit, bytemuck::cast_slice(s), dst);
            }
        }
    };
    let mut rest = view;
    if threads == 1 {
        write(Dst(rest.as_raw_ptr()), bytes);
        return;
    }
    std::thread::scope(|scope| {
        for s in bytes.chunks(chunk) {
            let (mut d, tail) = rest.split_at(s.len());
            rest = tail;
            let d = Dst(d.as_raw_ptr());
            scope.spawn(move || write(d, s));
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

/// Copies `src` into `dst` (of the same length), on several threads for large slices.
pub fn assign_slice<T: Copy + Send + Sync>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "assign_slice: lengths differ");
    let threads = copy_threads(std::mem::size_of_val(src));
    if threads == 1 {
        dst.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

/// Rows `r0..r0+rc` of each of `heads` consecutive `(rows, width)` matrices of `x` starting at
/// matrix `h0`: one slice of an input, gathered where it is copied to (no host copy first).
pub(crate) struct Rows<'a> {
    x: &'a [f32],
    h0: usize,
    heads: usize,
    rows: usize,
    r0: usize,
    rc: usize,
    width: usize,
}

pub(crate) fn gather(
    x: &[f32],
    h0: usize,
    heads: usize,
    rows: usize,
    r0: usize,
    rc: usize,
    width: usize,
) -> Rows<'_> {
    Rows {
        x,
        h0,
        heads,
        rows,
        r0,
        rc,
        width,
    }
}

impl<'a> Rows<'a> {
    /// Words in the slice.
    pub fn len(&self) -> usize {
        self.heads * self.rc * self.width
    }

    /// The slice where it is contiguous in `x` (whole rows of consecutive heads).
    pub fn whole(&self) -> Option<&'a [f32]> {
        let (rows, w) = (self.rows, self.width);
        (self.r0 == 0 && self.rc == rows || self.heads <= 1).then(|| {
            let start = (self.h0 * rows + self.r0) * w;
            &self.x[start..start + self.len()]
        })
    }

    /// Its contiguous pieces in order: one per head.
    pub fn parts(&self) -> impl Iterator<Item = &'a [f32]> + '_ {
        let x = self.x;
        (self.h0..self.h0 + self.heads).map(move |h| {
            let start = (h * self.rows + self.r0) * self.width;
            &x[start..start + self.rc * self.width]
        })
    }

    /// The slice as one host array.
    pub fn to_vec(&self) -> Vec<f32> {
        self.parts().flat_map(|p| p.iter().copied()).collect()
    }
}

/// The caller's input arrays uploaded once per attention call: the pre-pass and both passes bind
/// the same storage buffer wherever they take the same whole rows of an input (the inputs live
/// and stay unchanged for the whole call). Other slices, and everything where the call streams
/// (inputs beyond the device memory it may use), are uploaded into a few storage buffers per
/// label reused slice after slice ([`Uploads::scratch`]): no fresh memory per slice.
#[derive(Default)]
pub struct Uploads {
    /// Whole rows kept for the call by (address, length, mapped).
    buffers: RefCell<HashMap<(usize, usize, bool), Rc<wgpu::Buffer>>>,
    /// Per label, least recently used first.
    slots: RefCell<HashMap<String, Vec<Rc<wgpu::Buffer>>>>,
    streaming: bool,
    /// An input (address, length) read through a map from some point of the call on.
    mapped: RefCell<Option<MappedInput>>,
}

/// The address and length of an input and the map its slices go through.
type MappedInput = (usize, usize, Arc<dyn RowMap>);

/// Storage buffers kept per label: a slice is uploaded into one while a dispatch reads the other.
const SLOTS: usize = 2;

impl Uploads {
    /// Uploads kept for the whole call where `streaming` is false, else none.
    pub fn new(streaming: bool) -> Self {
        Uploads {
            streaming,
            ..Default::default()
        }
    }

    /// Whether the call streams its inputs (nothing kept on the device).
    pub fn streams(&self) -> bool {
        self.streaming
    }

    /// From now on the slices of `x` are uploaded mapped by `map` (the value map of the poly
    /// passes), each as it is copied to the device.
    pub(crate) fn map_input(&self, x: &[f32], map: Arc<dyn RowMap>) {
        *self.mapped.borrow_mut() = Some((x.as_ptr() as usize, x.len(), map));
    }

    /// Frees the uploaded inputs (before a kernel that uploads its own).
    pub fn clear(&self) {
        self.buffers.borrow_mut().clear();
        self.slots.borrow_mut().clear();
    }

    pub(crate) fn buffer(&self, gpu: &Gpu, data: Rows<'_>, label: &str) -> Rc<wgpu::Buffer> {
        let map = self
            .mapped
            .borrow()
            .as_ref()
            .filter(|(at, len, _)| (*at, *len) == (data.x.as_ptr() as usize, data.x.len()))
            .map(|(_, _, m)| m.clone());
        let map = map.as_deref();
        match data.whole() {
            Some(rows) if !self.streaming && data.r0 == 0 && data.rc == data.rows => self
                .buffers
                .borrow_mut()
                .entry((rows.as_ptr() as usize, rows.len(), map.is_some()))
                .or_insert_with(|| {
                    let buf = storage_buffer(gpu, rows.len(), label);
                    upload_rows_mapped(gpu, &buf, &data, map);
                    Rc::new(buf)
                })
                .clone(),
            _ => {
                let buf = self.scratch(gpu, data.len(), label);
                upload_rows_mapped(gpu, &buf, &data, map);
                buf
            }
        }
    }

    /// A storage buffer of at least `words` words for one slice: the least recently used of this
    /// label's that no caller holds any more (dispatches still reading it run first: the queue
    /// orders the next write after them), else a new one.
    pub(crate) fn scratch(&self, gpu: &Gpu, words: usize, label: &str) -> Rc<wgpu::Buffer> {
        let bytes = (words.max(1) * 4) as u64;
        let mut slots = self.slots.borrow_mut();
        let list = slots.entry(label.to_string()).or_default();
        let free = |b: &Rc<wgpu::Buffer>| Rc::strong_count(b) == 1;
        let buf = match list.iter().position(|b| free(b) && b.size() >= bytes) {
            Some(i) => list.remove(i),
            None => {
                if list.len() >= SLOTS {
                    if let Some(i) = list.iter().position(free) {
                        list.remove(i); // too small
                    }
                }
                Rc::new(storage_buffer(gpu, words, label))
            }
        };
        if list.len() < SLOTS {
            list.push(buf.clone());
        }
        buf
    }
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
