//! Adapter choice, one lazily created device per process, feature detection and the pipeline cache.
//!
//! The device is created with the adapter's own limits (not the WebGPU defaults), so the planner
//! can use all the workgroup memory the hardware offers. After a device loss the next call to
//! [`gpu`] builds a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Config;
use crate::error::Error;

/// What the planner and the user need to know about the adapter.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Kernel parameters bound as read-only storage instead of uniform buffers (lavapipe
    /// through Vulkan: see `Gpu::pipeline`).
    pub params_in_storage: bool,
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// Words (4 bytes) of workgroup memory one workgroup may use: the "fast memory" M.
    pub fast_memory_words: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size_x: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_storage_buffers_per_shader_stage: u32,
    pub min_storage_buffer_offset_alignment: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamp_queries: bool,
    pub cooperative_matrix: bool,
    /// The adapter offers 16x16x16 cooperative matrices with f16 operands and f32 accumulators,
    /// one subgroup size, and f16 in shaders: the tensor-core path of the poly passes can run.
    pub coop_f16: bool,
    /// Subgroup size when the adapter has exactly one (0 otherwise).
    pub subgroup_size: u32,
    /// Shaders may use `unpack2x16float` (wgpu's downlevel SHADER_F16_IN_F32; Mesa's Vulkan
    /// drivers lack it without shader f16): the exact kernel can read f16 storage.
    pub f16_storage: bool,
}

/// Calls that have taken `Gpu::exclusive`, on any device: work a call left pending is known by
/// its number (`launch` drops what an earlier, failed call left).
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of the call that holds `Gpu::exclusive` now.
pub(crate) fn current_call() -> u64 {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The shared GPU: device, queue and compiled pipelines. All GPU work is serialized by `run_lock`.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: DeviceInfo,
    lost: Arc<AtomicBool>,
    uncaptured: Arc<Mutex<Option<String>>>,
    pipelines: Mutex<PipelineCache<Arc<wgpu::ComputePipeline>>>,
    run_lock: Mutex<()>,
    /// Host-visible staging buffers kept between calls (see `transfer::upload`): idle upload
    /// buffers, mapped for writing, and idle readback buffers.
    pub(crate) upload_pool: Arc<StagingPool>,
    pub(crate) readback_pool: Arc<StagingPool>,
    /// Host <-> device traffic since the device was created (see `traffic::Traffic`); a call
    /// reports the difference over its run, which holds `exclusive`.
    pub(crate) traffic: crate::traffic::Traffic,
}

/// Idle staging buffers of one direction, and the bytes of all buffers the pool created that
/// are still alive (idle or in use), which `launch::allocated_bytes` leaves out.
#[derive(Default)]
pub(crate) struct StagingPool {
    pub(crate) idle: Mutex<Vec<wgpu::Buffer>>,
    /// Submissions of copies out of this pool's buffers not yet known to be done, oldest first.
    pub(crate) in_flight: Mutex<std::collections::VecDeque<wgpu::SubmissionIndex>>,
    pub(crate) live_bytes: std::sync::atomic::AtomicU64,
}

/// Most compiled pipelines a device keeps (least recently used go first): a process that calls
/// many shapes would otherwise keep every one (on lavapipe 15 exact shapes grew RSS by 160 MB
/// with every pipeline kept, 65 MB with 4). A call uses at most five.
pub const MAX_CACHED_PIPELINES: usize = 32;

/// Compiled pipelines by key, at most `cap`, the least recently used evicted first.
pub(crate) struct PipelineCache<P> {
    entries: HashMap<String, (P, u64)>,
    clock: u64,
    cap: usize,
}

impl<P: Clone> PipelineCache<P> {
    pub(crate) fn new(cap: usize) -> Self {
        PipelineCache {
            entries: HashMap::new(),
            clock: 0,
            cap,
        }
    }

    pub(crate) fn get(&mut self, key: &str) -> Option<P> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(p, used)| {
            *used = now;
            p.clone()
        })
    }

    pub(crate) fn insert(&mut self, key: String, p: P) {
        while self.entries.len() >= self.cap {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
        self.clock += 1;
        self.entries.insert(key, (p, self.clock));
    }

    /// Drops every entry; returns how many there were.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        n
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

static GPU: Mutex<Option<Arc<Gpu>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another thread must not poison the device for the whole process.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process-wide device, created on first use (or again after a device loss).
pub fn gpu() -> Result<Arc<Gpu>, Error> {
    let mut slot = lock(&GPU);
    if let Some(g) = slot.as_ref() {
        if !g.lost.load(Ordering::SeqCst) {
            return Ok(g.clone());
        }
    }
    let g = Arc::new(Gpu::create()?);
    *slot = Some(g.clone());
    Ok(g)
}

/// The current device, if one was created and is not lost; never creates one.
pub fn current_gpu() -> Option<Arc<Gpu>> {
    lock(&GPU)
        .as_ref()
        .filter(|g| !g.lost.load(Ordering::SeqCst))
        .cloned()
}

fn device_type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u32 {
    // Prefer the native compute APIs over GL when one adapter shows up through several.
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

const NO_DEVICE_HELP: &str = "approx_attn needs a GPU driver that wgpu can use (Vulkan, Metal, \
DX12 or GL). On a machine without a GPU install a software Vulkan driver, e.g. on Debian/Ubuntu \
`apt-get install mesa-vulkan-drivers libvulkan1` (lavapipe).";

/// List every adapter wgpu can see: (name, backend, device type).
pub fn list_adapters() -> Result<Vec<(String, String, String)>, Error> {
    let backends = Config::from_env().backends?;
    let instance = new_instance(backends);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    Ok(adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            (
                i.name,
                format!("{:?}", i.backend),
                format!("{:?}", i.device_type),
            )
        })
        .collect())
}

fn new_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// The adapter the process uses: of the allowed backends (`APPROX_ATTN_BACKEND`; GL only when no
/// native compute API has one), whose name contains `APPROX_ATTN_ADAPTER`, the most capable kind
/// first.
fn choose_adapter(cfg: &Config) -> Result<wgpu::Adapter, Error> {
    let backends = cfg.backends.clone()?;
    // GL only when asked for or when no native compute API has an adapter: probing it is slow
    // and noisy on headless machines.
    let native = backends & !wgpu::Backends::GL;
    let mut instance = new_instance(native);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(native));
    if adapters.is_empty() && backends.contains(wgpu::Backends::GL) {
        instance = new_instance(wgpu::Backends::GL);
        adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::GL));
    }
    if let Some(want) = &cfg.adapter {
        let want_l = want.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want_l));
        if adapters.is_empty() {
            return Err(Error::NoDevice(format!(
                "no adapter name contains APPROX_ATTN_ADAPTER={want:?}; adapters seen: {names:?}"
            )));
        }
    }
    // Highest-performance first: discrete > integrated > virtual > other > CPU.
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (device_type_rank(i.device_type), backend_rank(i.backend))
    });
    adapters
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoDevice(format!("no GPU adapter found. {NO_DEVICE_HELP}")))
}

impl Gpu {
    fn create() -> Result<Gpu, Error> {
        let cfg = Config::from_env();
        let adapter = choose_adapter(&cfg)?;

        let ai = adapter.get_info();
        let af = adapter.features();
        let limits = adapter.limits();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::SUBGROUP_BARRIER
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let wanted_coop = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP;
        let subgroup_size = if ai.subgroup_min_size == ai.subgroup_max_size {
            ai.subgroup_min_size
        } else {
            0
        };
        let coop_f16 = af.contains(wanted_coop)
            && subgroup_size > 0
            && adapter.cooperative_matrix_properties().iter().any(|c| {
                (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                    && c.ab_type == wgpu::wgt::CooperativeScalarType::F16
                    && c.cr_type == wgpu::wgt::CooperativeScalarType::F32
            })
            && !cfg.no_coop;
        let mut required_features = af & wanted;
        if coop_f16 {
            required_features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("approx_attn"),
            required_features,
            required_limits: limits.clone(),
            experimental_features: if coop_f16 {
                // SAFETY: only the cooperative-matrix feature is experimental here; its shaders
                // are validated by naga and checked against the f32 path in the tests.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::NoDevice(format!("could not open a device on {}: {e}", ai.name)))?;

        let lost = Arc::new(AtomicBool::new(false));
        let lost_cb = lost.clone();
        device.set_device_lost_callback(move |_reason, _msg| lost_cb.store(true, Ordering::SeqCst));
        // The default handler panics; keep the message and raise it as an exception instead.
        let uncaptured = Arc::new(Mutex::new(None));
        let unc = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            *lock(&unc) = Some(e.to_string());
        }));

        let info = DeviceInfo {
            params_in_storage: ai.backend == wgpu::Backend::Vulkan && ai.name.contains("llvmpipe"),
            adapter: ai.name.clone(),
            backend: format!("{:?}", ai.backend).to_lowercase(),
            device_type: format!("{:?}", ai.device_type),
            driver: format!("{} {}", ai.driver, ai.driver_info)
                .trim()
                .to_string(),
            fast_memory_words: u64::from(limits.max_compute_workgroup_storage_size) / 4,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: limits.max_compute_workgroup_size_x,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
            min_storage_buffer_offset_alignment: limits.min_storage_buffer_offset_alignment,
            shader_f16: af.contains(wgpu::Features::SHADER_F16),
            subgroups: af.contains(wgpu::Features::SUBGROUP),
            timestamp_queries: af.contains(wgpu::Features::TIMESTAMP_QUERY),
            cooperative_matrix: af.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            coop_f16,
            subgroup_size,
            f16_storage: adapter
                .get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32),
        };
        Ok(Gpu {
            device,
            queue,
            info,
            lost,
            uncaptured,
            pipelines: Mutex::new(PipelineCache::new(MAX_CACHED_PIPELINES)),
            run_lock: Mutex::new(()),
            upload_pool: Arc::default(),
            readback_pool: Arc::default(),
            traffic: Default::default(),
        })
    }

    /// Serializes GPU work of all threads; error scopes are per thread and must not interleave.
    pub fn exclusive(&self) -> MutexGuard<'_, ()> {
        let guard = lock(&self.run_lock);
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        guard
    }

    /// A compute pipeline for `source` (WGSL), compiled once per device and cached by `key`.
    pub fn pipeline(
        &self,
        key: &str,
        source: &str,
        trusted: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>, Error> {
        if let Some(p) = lock(&self.pipelines).get(key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        // Mesa's lavapipe (22.x) inlines the values of uniform buffers that steer loops and
        // compiles a new variant of the shader at every dispatch, keeping each one: about one
        // executable mapping and 0.5 MiB per dispatch (examples/leak_repro.rs). Parameters in a
        // read-only storage buffer are not inlined; `uniform_buffer` makes buffers for either.
        let source = if self.info.params_in_storage {
            source.replace("var<uniform> ", "var<storage, read> ")
        } else {
            source.to_string()
        };
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = if trusted {
            // SAFETY: the generated shaders guard every storage access by the bounds passed in
            // their parameters; tests run with the checks on (trusted = false).
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[],
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("shader {key} failed to compile: {e}")));
        }
        let p = Arc::new(pipeline);
        lock(&self.pipelines).insert(key.to_string(), p.clone());
        Ok(p)
    }

    /// Drops the compiled pipelines (`empty_cache`); calls compile what they need again.
    /// Returns how many were dropped.
    pub fn clear_pipelines(&self) -> usize {
        let n = lock(&self.pipelines).clear();
        // wgpu frees dropped resources at its next maintenance.
        let _ = self.device.poll(wgpu::PollType::Poll);
        n
    }

    /// Compiled pipelines the device keeps now.
    pub fn cached_pipelines(&self) -> usize {
        lock(&self.pipelines).len()
    }

    /// Runs `work` inside out-of-memory and validation error scopes and waits for the queue, turning
    /// every failure (including device loss) into an [`Error`].
    pub fn checked<T>(&self, work: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = work();
        let val_err = pollster::block_on(val.pop());
        let oom_err = pollster::block_on(oom.pop());
        // Work is submitted without waiting: a lost device may show only as a validation error
        // here, before any wait found it. A poll tells.
        if (val_err.is_some() || oom_err.is_some())
            && self.device.poll(wgpu::PollType::Poll).is_err()
        {
            self.lost.store(true, Ordering::SeqCst);
            return Err(Error::DeviceLost(
                "the GPU device was lost; the next call creates a new one".into(),
            ));
        }
        if let Some(e) = oom_err {
            return Err(Error::OutOfMemory(format!(
                "the GPU ran out of memory: {e}"
            )));
        }
        if let Some(e) = val_err {
            return Err(Error::Gpu(format!("wgpu validation error: {e}")));
        }
        if let Some(msg) = lock(&self.uncaptured).take() {
            return Err(Error::Gpu(msg));
        }
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::DeviceLost(
                "the GPU device was lost; the next call creates a new one".into(),
            ));
        }
        result
    }

    /// Blocks until all submitted work is done, checking for an interrupt (Ctrl-C) every
    /// [`crate::interrupt::CHECK_EVERY`] (the work already submitted then finishes in the
    /// background; the next call's first wait waits for it).
    pub fn wait(&self) -> Result<(), Error> {
        self.wait_for(None)
    }

    /// [`Gpu::wait`] for the submission `index` and those before it only (all where None): later
    /// submissions keep the device busy meanwhile.
    pub fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<(), Error> {
        self.traffic.timed(crate::traffic::HostStage::Wait, || {
            self.wait_untimed(index, true)
        })
    }

    /// [`Gpu::wait_for`] that leaves a Ctrl-C to the call's next interruptible wait: for waits
    /// that cannot return an error (an upload waiting for staging memory).
    pub(crate) fn wait_for_quietly(&self, index: wgpu::SubmissionIndex) {
        self.traffic.timed(crate::traffic::HostStage::Wait, || {
            let _ = self.wait_untimed(Some(index), false);
        })
    }

    fn wait_untimed(
        &self,
        index: Option<wgpu::SubmissionIndex>,
        interruptible: bool,
    ) -> Result<(), Error> {
        let check = || match interruptible {
            true => crate::interrupt::check(),
            false => Ok(()),
        };
        // Also before waiting: a call of many short dispatches may never wait 100 ms at once.
        check()?;
        loop {
            let poll = self.device.poll(wgpu::PollType::Wait {
                submission_index: index.clone(),
                timeout: Some(crate::interrupt::CHECK_EVERY),
            });
            match poll {
                Ok(_) => return Ok(()),
                Err(wgpu::PollError::Timeout) => check()?,
                Err(e) => {
                    self.lost.store(true, Ordering::SeqCst);
                    return Err(Error::DeviceLost(format!(
                        "waiting for the GPU failed: {e}"
                    )));
                }
            }
        }
    }

    /// Marks the device lost so that the next [`gpu`] call creates a new one.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::PipelineCache;

    #[test]
    fn pipeline_cache_keeps_at_most_cap_and_evicts_the_least_recently_used() {
        let mut c = PipelineCache::new(3);
        for k in ["a", "b", "c"] {
            c.insert(k.to_string(), k);
        }
        assert_eq!(c.get("a"), Some("a")); // a is now the most recent
        c.insert("d".to_string(), "d"); // evicts b
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("b"), None);
        assert_eq!(c.get("a"), Some("a"));
        assert_eq!(c.get("c"), Some("c"));
        assert_eq!(c.get("d"), Some("d"));
        assert_eq!(c.clear(), 3);
        assert_eq!(c.len(), 0);
    }
}
