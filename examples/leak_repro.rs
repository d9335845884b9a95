//! Diagnostic, not part of CI: host memory growth of repeated compute dispatches with wgpu alone.
//! Watches the resident set (VmRSS) and the executable mappings of /proc/self/maps (JIT code)
//! while one cached pipeline is dispatched again and again.
//!
//! `cargo run --release --example leak_repro [uniform|storage|small] [dispatches]`
//!
//! - `uniform`: the loop bound is read from a uniform buffer (as the poly kernels' parameters
//!   are);
//! - `storage`: the same shader with the parameters in a read-only storage buffer;
//! - `small`: the uniform shader without its unrolled body (under 100 SSA values).
//!
//! On Mesa 22.3's lavapipe, `uniform` adds one executable mapping per dispatch and RSS grows:
//! lavapipe inlines uniform values that steer loops (shaders above 100 SSA values) and compiles
//! a new variant of the shader at every dispatch after the pipeline is bound, without caching or
//! freeing it. `storage` and `small` stay flat.

use std::time::Instant;

const SHADER: &str = r#"
struct Params { n: u32, m: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<{{SPACE}}> params: Params;
@group(0) @binding(1) var<storage, read_write> data: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    var acc = 0.0;
    for (var i = 0u; i < params.n; i++) {
        let x = data[(gid.x + i) % params.m];
{{BODY}}
    }
    data[gid.x % params.m] = acc;
}
"#;

fn shader(mode: &str) -> String {
    let space = if mode == "storage" {
        "storage, read"
    } else {
        "uniform"
    };
    let terms = if mode == "small" { 1 } else { 40 };
    let body: String = (0..terms)
        .map(|t| format!("        acc = fma(acc, x, {}.0 + x * {t}.5);\n", t + 1))
        .collect();
    SHADER
        .replace("{{SPACE}}", space)
        .replace("{{BODY}}", &body)
}

/// (VmRSS in MiB, executable mappings).
fn memory() -> (f64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let exec = maps
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')))
        .count();
    (rss_kib / 1024.0, exec)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("uniform", String::as_str).to_string();
    let dispatches: usize = args.get(2).and_then(|x| x.parse().ok()).unwrap_or(200);
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN;
    let instance = wgpu::Instance::new(desc);
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("a Vulkan adapter");
    println!(
        "{} ({:?}), mode {mode}",
        adapter.get_info().name,
        adapter.get_info().backend
    );
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
            .expect("a device");
    if mode.starts_with("prepass") {
        return prepass(&device, &queue, &mode, dispatches);
    }
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(shader(&mode).into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let usage = if mode == "storage" {
        wgpu::BufferUsages::STORAGE
    } else {
        wgpu::BufferUsages::UNIFORM
    } | wgpu::BufferUsages::COPY_DST;
    let params = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage,
        mapped_at_creation: false,
    });
    queue.write_buffer(&params, 0, bytemuck::cast_slice(&[16u32, 1024, 0, 0]));
    let data = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4096,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    // One bind group and buffers for every dispatch: nothing is created per dispatch.
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: data.as_entire_binding(),
            },
        ],
    });
    let start = Instant::now();
    let before = memory();
    for i in 0..=dispatches {
        if i % (dispatches / 4).max(1) == 0 {
            let (rss, exec) = memory();
            println!(
                "after {i:5} dispatches: VmRSS {rss:8.1} MiB ({:+.1}), executable mappings {exec} ({:+})",
                rss - before.0,
                exec as i64 - before.1 as i64
            );
        }
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(16, 1, 1);
        }
        queue.submit([enc.finish()]);
        device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .expect("poll");
    }
    println!(
        "{:.2} ms per dispatch",
        start.elapsed().as_secs_f64() * 1e3 / dispatches as f64
    );
}

fn storage(device: &wgpu::Device, words: usize, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (words * 4) as u64,
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// The poly pre-pass as the package generates it (E = 16, 512 rows, 8 units), its parameters in a
/// uniform buffer: `prepass-fresh` creates the parameter buffer and the bind group per dispatch
/// (as the package does), `prepass-reuse` creates them once, `prepass-alternate` reuses two
/// bind groups whose parameters differ and alternates them, `prepass-storage` reuses them with
/// the parameters in a storage buffer instead.
fn prepass(device: &wgpu::Device, queue: &wgpu::Queue, mode: &str, dispatches: usize) {
    let (w, rows, units) = (16usize, 512usize, 8usize);
    let tile_rows = approx_attn::poly::prepass::prepass_tile_rows(w, 8192);
    let mut src = approx_attn::poly::prepass::prepass_source(w, tile_rows, false);
    let params_usage = if mode == "prepass-storage" {
        // The same shader with its parameters in a read-only storage buffer.
        src = src.replace("var<uniform> params", "var<storage, read> params");
        wgpu::BufferUsages::STORAGE
    } else {
        wgpu::BufferUsages::UNIFORM
    };
    if std::env::var_os("DUMP_WGSL").is_some() {
        println!("{src}");
    }
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let rows_per_block = tile_rows * 2;
    let blocks = rows.div_ceil(rows_per_block);
    let st = wgpu::BufferUsages::STORAGE;
    let x = storage(device, units * rows * w, st);
    let x_data: Vec<f32> = (0..units * rows * w)
        .map(|i| (i % 7) as f32 * 0.1)
        .collect();
    queue.write_buffer(&x, 0, bytemuck::cast_slice(&x_data));
    let mu = storage(device, units * w, st);
    let out = storage(device, units * blocks * (3 * w + 2), st);
    let bind_for = |use_mu: u32| {
        let params = storage(device, 4, params_usage);
        let p = [rows as u32, rows_per_block as u32, blocks as u32, use_mu];
        queue.write_buffer(&params, 0, bytemuck::cast_slice(&p));
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: x.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: mu.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: out.as_entire_binding(),
                },
            ],
        });
        (params, bind)
    };
    let kept = [bind_for(0), bind_for(1)];
    let before = memory();
    for i in 0..=dispatches {
        if i % (dispatches / 4).max(1) == 0 {
            let (rss, exec) = memory();
            println!(
                "after {i:5} dispatches: VmRSS {rss:8.1} MiB ({:+.1}), executable mappings {exec} ({:+})",
                rss - before.0,
                exec as i64 - before.1 as i64
            );
        }
        let fresh;
        let bind = match mode {
            "prepass-fresh" => {
                fresh = bind_for(1);
                &fresh.1
            }
            "prepass-alternate" => &kept[i % 2].1,
            _ => &kept[1].1,
        };
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, bind, &[]);
            pass.dispatch_workgroups(blocks as u32, units as u32, 1);
        }
        queue.submit([enc.finish()]);
        device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .expect("poll");
    }
}
