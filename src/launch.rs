//! The dispatch path: bind, dispatch, timestamps, I/O counters, readback; what a run measured.

use std::sync::atomic::Ordering;
use std::sync::mpsc;

use crate::device::Gpu;
use crate::error::Error;
use crate::transfer::{
    assign_parallel, finish_mapped, readback_buffer, storage_buffer, submit, uniform_buffer,
    PooledReadback, TrafficCount,
};

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
    /// Bytes moved host <-> device and input slices uploaded over the whole call (set by the
    /// call once it ends; dispatches leave it zero).
    pub traffic: TrafficCount,
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
            traffic: TrafficCount::default(),
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

/// Whether dispatches overlap: only a result the host needs is waited for, and a readback is
/// mapped while the next dispatch runs. `APPROX_ATTN_NO_OVERLAP=1` waits after every dispatch
/// (the results are the same bit for bit; for comparisons).
pub(crate) fn overlap() -> bool {
    !crate::config::no_overlap()
}

/// A readback buffer whose mapping was requested with its submission.
pub(crate) struct Mapping {
    rx: mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
    got: Option<Result<(), wgpu::BufferAsyncError>>,
}

impl Mapping {
    /// Requests the mapping of the first `bytes` of `buf` (after the work submitted so far).
    pub(crate) fn request(buf: &wgpu::Buffer, bytes: u64) -> Mapping {
        let (tx, rx) = mpsc::channel();
        buf.slice(..bytes.max(4))
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        Mapping { rx, got: None }
    }

    /// Whether the mapping is done (without waiting).
    fn ready(&mut self) -> bool {
        if self.got.is_none() {
            self.got = self.rx.try_recv().ok();
        }
        self.got.is_some()
    }

    /// Waits for submission `index` and the mapping, then hands the first `bytes` of `buf` to
    /// `read` and unmaps it.
    pub(crate) fn read<T>(
        self,
        gpu: &Gpu,
        index: &wgpu::SubmissionIndex,
        buf: &wgpu::Buffer,
        bytes: u64,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, Error> {
        let got = match self.got.map_or_else(|| self.rx.try_recv(), Ok) {
            Ok(r) => Ok(r),
            Err(_) => {
                if let Err(e) = gpu.wait_for(Some(index.clone())) {
                    // Interrupted or lost: the mapping is cancelled (the buffer may be pooled).
                    buf.unmap();
                    return Err(e);
                }
                self.rx.recv()
            }
        };
        finish_mapped(gpu, buf, bytes, got, read)
    }
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

    /// Seconds between start and stop, from the mapped readback.
    fn seconds_of(&self, b: &[u8]) -> f64 {
        let t: &[u64] = bytemuck::cast_slice(b);
        t[1].saturating_sub(t[0]) as f64 * self.period_ns * 1e-9
    }
}

/// The timestamps and I/O counter of a submitted dispatch, read once its submission is done.
pub(crate) struct Pending {
    /// The call that submitted it (`device::current_call`).
    call: u64,
    pass: &'static str,
    index: wgpu::SubmissionIndex,
    timer: Option<(Timer, Mapping)>,
    counter: Option<(wgpu::Buffer, Mapping)>,
}

impl Pending {
    /// Whether its readbacks are mapped (its submission is done), without waiting.
    fn ready(&mut self) -> bool {
        let timer = self.timer.as_mut().is_none_or(|(_, m)| m.ready());
        timer && self.counter.as_mut().is_none_or(|(_, m)| m.ready())
    }

    /// Its kernel time and counted words (no dispatch counted: that was at submission).
    fn resolve(self, gpu: &Gpu) -> Result<RunStats, Error> {
        let counted = match self.counter {
            Some((buf, m)) => Some(m.read(gpu, &self.index, &buf, 8, |b| {
                let w: &[u32] = bytemuck::cast_slice(b);
                (u64::from(w[0]), u64::from(w[1]))
            })?),
            None => None,
        };
        let kernel_s = match self.timer {
            Some((tm, m)) => {
                Some(m.read(gpu, &self.index, &tm.readback, 16, |b| tm.seconds_of(b))?)
            }
            None => None,
        };
        Ok(RunStats {
            dispatches: 0,
            gpu_allocated_bytes: None,
            ..RunStats::dispatch(gpu, self.pass, counted, kernel_s)
        })
    }
}

/// Dispatches submitted without waiting whose timestamps and counters are read at the call's
/// next wait ([`Launch::run`]). Kept here, not on the device, which knows nothing of launches.
static PENDING: std::sync::Mutex<Vec<Pending>> = std::sync::Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<Pending>> {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    // Left by an earlier call that failed (on this device or a lost one): not this call's.
    let call = crate::device::current_call();
    pending.retain(|p| p.call == call);
    pending
}

/// The stats of the dispatches submitted without waiting that are done, in order up to the
/// first that is not (`wait`: all of them, waiting for them).
pub(crate) fn settle_pending(gpu: &Gpu, wait: bool) -> Result<RunStats, Error> {
    let done: Vec<Pending> = {
        let mut pending = pending();
        let n = match wait {
            true => pending.len(),
            false => pending
                .iter_mut()
                .position(|p| !p.ready())
                .unwrap_or(pending.len()),
        };
        pending.drain(..n).collect()
    };
    let mut stats = RunStats::default();
    for p in done {
        stats.absorb(&p.resolve(gpu)?);
    }
    Ok(stats)
}

/// A submitted dispatch whose readback is mapped once it is done ([`Submitted::finish`]).
pub(crate) struct Submitted<'g> {
    pending: Option<Pending>,
    out: Option<(PooledReadback<'g>, Mapping, u64)>,
    allocated: Option<u64>,
}

impl Submitted<'_> {
    /// Waits for this dispatch (and those before it), hands the words read back to `read`
    /// (empty where nothing was read) and returns its stats with those of the dispatches
    /// submitted before it without waiting.
    pub(crate) fn finish<T>(
        mut self,
        gpu: &Gpu,
        read: impl FnOnce(&[f32]) -> T,
    ) -> Result<(T, RunStats), Error> {
        let index = match &self.pending {
            Some(p) => p.index.clone(),
            None => return Err(Error::Gpu("a dispatch was finished twice".into())),
        };
        let out = match self.out.take() {
            Some((buf, m, bytes)) => m.read(gpu, &index, &buf, bytes, |b| {
                read(bytemuck::cast_slice::<u8, f32>(b))
            })?,
            None => {
                gpu.wait_for(Some(index))?;
                read(&[])
            }
        };
        // Those submitted before this one are done; later ones (overlapping) stay pending.
        let mut stats = settle_pending(gpu, false)?;
        let pending = self.pending.take().expect("present until finished");
        stats.absorb(&RunStats {
            dispatches: 1,
            gpu_allocated_bytes: self.allocated,
            ..pending.resolve(gpu)?
        });
        Ok((out, stats))
    }
}

impl Drop for Submitted<'_> {
    fn drop(&mut self) {
        // Not finished (an error came first): cancel the mapping before the readback buffer
        // goes back to its pool.
        if let Some((buf, _, _)) = &self.out {
            buf.unmap();
        }
    }
}

/// One dispatch of a kernel: the pass it belongs to (named in [`RunStats::pass_s`]), its pipeline,
/// its parameters (a `#[repr(C)]` struct laid out as the shader's uniform at binding 0), its
/// storage buffers in binding order after them, and the workgroup grid.
pub(crate) struct Launch<'a, P> {
    pub pass: &'static str,
    pub pipeline: &'a wgpu::ComputePipeline,
    pub params: &'a P,
    pub buffers: &'a [&'a wgpu::Buffer],
    pub grid: (u32, u32, u32),
}

impl<P: bytemuck::Pod> Launch<'_, P> {
    /// The one dispatch path of every kernel: binds the parameters, the buffers and (when
    /// counting) the I/O counter after them, dispatches inside a timed pass, copies the first
    /// `words` floats of each of `reads` back into one host vector (in order), and waits. Returns
    /// that vector and the dispatch's stats. Without `reads` (and with [`overlap`]) it does not
    /// wait: its timestamps are read at the next dispatch that reads back.
    pub(crate) fn run(
        &self,
        gpu: &Gpu,
        opts: &RunOptions,
        reads: &[(&wgpu::Buffer, usize)],
    ) -> Result<(Vec<f32>, RunStats), Error> {
        if reads.is_empty() && overlap() {
            let mut sub = self.submit(gpu, opts, reads);
            let pending = sub.pending.take().expect("present until finished");
            self::pending().push(pending);
            let stats = RunStats {
                dispatches: 1,
                gpu_allocated_bytes: sub.allocated,
                ..RunStats::default()
            };
            return Ok((Vec::new(), stats));
        }
        self.run_reading(gpu, opts, reads, |words| {
            let mut out = Vec::new();
            assign_parallel(&mut out, words);
            out
        })
    }

    /// [`Launch::run`] handing the mapped words read back to `read` (empty where `reads` is)
    /// instead of copying them into a new vector: a caller places them where they belong.
    pub(crate) fn run_reading<T>(
        &self,
        gpu: &Gpu,
        opts: &RunOptions,
        reads: &[(&wgpu::Buffer, usize)],
        read: impl FnOnce(&[f32]) -> T,
    ) -> Result<(T, RunStats), Error> {
        self.submit(gpu, opts, reads).finish(gpu, read)
    }

    /// Submits the dispatch and the copies of `reads` into one readback buffer, whose mapping
    /// is requested at once; [`Submitted::finish`] reads it.
    pub(crate) fn submit<'g>(
        &self,
        gpu: &'g Gpu,
        opts: &RunOptions,
        reads: &[(&wgpu::Buffer, usize)],
    ) -> Submitted<'g> {
        let params = uniform_buffer(gpu, bytemuck::bytes_of(self.params));
        let counter = opts.count_io.then(|| storage_buffer(gpu, 2, "io_words"));
        let bound = std::iter::once(&params)
            .chain(self.buffers.iter().copied())
            .chain(counter.as_ref());
        let entries: Vec<wgpu::BindGroupEntry> = bound
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        if let Some(cb) = &counter {
            gpu.queue.write_buffer(cb, 0, &[0u8; 8]);
        }
        let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.pass),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let timer = Timer::new(gpu);
        let words: usize = reads.iter().map(|(_, w)| w).sum();
        let buf = (words > 0).then(|| PooledReadback::new(gpu, (words * 4) as u64));
        let counter_read = counter.as_ref().map(|_| readback_buffer(gpu, 8));
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass =
                enc.begin_compute_pass(&timer.as_ref().map(Timer::pass).unwrap_or_default());
            pass.set_pipeline(self.pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(self.grid.0, self.grid.1, self.grid.2);
        }
        if let Some(tm) = &timer {
            tm.stop(&mut enc);
        }
        if let Some(r) = &buf {
            let mut at = 0u64;
            for &(buf, w) in reads.iter().filter(|(_, w)| *w > 0) {
                enc.copy_buffer_to_buffer(buf, 0, r, at, (w * 4) as u64);
                at += (w * 4) as u64;
            }
        }
        if let (Some(cb), Some(cr)) = (&counter, &counter_read) {
            enc.copy_buffer_to_buffer(cb, 0, cr, 0, 8);
        }
        let index = submit(gpu, enc);
        let bytes = (words * 4) as u64;
        Submitted {
            out: buf.map(|r| {
                let m = Mapping::request(&r, bytes);
                (r, m, bytes)
            }),
            pending: Some(Pending {
                call: crate::device::current_call(),
                pass: self.pass,
                index,
                timer: timer.map(|tm| {
                    let m = Mapping::request(&tm.readback, 16);
                    (tm, m)
                }),
                counter: counter_read.map(|cr| {
                    let m = Mapping::request(&cr, 8);
                    (cr, m)
                }),
            }),
            allocated: allocated_bytes(gpu),
        }
    }
}
