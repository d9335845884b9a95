//! Diagnostic: does this adapter run wgpu's cooperative matrices (f16 operands, f32 accumulators)
//! from workgroup memory, and how fast? Prints the adapter's configurations, checks a small product
//! against the CPU and times an n x n x n product (C = A B, f32 in storage, f16 tiles in workgroup
//! memory, four subgroups of 16 x 64 output each).
//!
//! `cargo run --release --example coop_probe [n]`

use std::time::Instant;

use approx_attn::device;

const SRC: &str = r#"
enable f16;
enable wgpu_cooperative_matrix;

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const N: u32 = {{N}}u; // a constant: naga 30 cannot write coopStore with a runtime stride
const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 32u;
var<workgroup> a_t: array<f16, 2048>; // BM x BK
var<workgroup> b_t: array<f16, 2048>; // BK x BN

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    var acc0 = coop_mat16x16<f32, C>();
    var acc1 = coop_mat16x16<f32, C>();
    var acc2 = coop_mat16x16<f32, C>();
    var acc3 = coop_mat16x16<f32, C>();
    for (var k0 = 0u; k0 < N; k0 += BK) {
        for (var i = lid; i < BM * BK; i += 128u) {
            a_t[i] = f16(a[(m0 + i / BK) * N + k0 + i % BK]);
            b_t[i] = f16(b[(k0 + i / BN) * N + n0 + i % BN]);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let ia = sg * 16u * BK + kk;
            let ib = kk * BN;
            let x = coopLoadT<coop_mat16x16<f16, A>>(&a_t[ia], BK);
            let y0 = coopLoadT<coop_mat16x16<f16, B>>(&b_t[ib], BN);
            let y1 = coopLoadT<coop_mat16x16<f16, B>>(&b_t[ib + 16u], BN);
            let y2 = coopLoadT<coop_mat16x16<f16, B>>(&b_t[ib + 32u], BN);
            let y3 = coopLoadT<coop_mat16x16<f16, B>>(&b_t[ib + 48u], BN);
            acc0 = coopMultiplyAdd(x, y0, acc0);
            acc1 = coopMultiplyAdd(x, y1, acc1);
            acc2 = coopMultiplyAdd(x, y2, acc2);
            acc3 = coopMultiplyAdd(x, y3, acc3);
        }
        workgroupBarrier();
    }
    let o = (m0 + sg * 16u) * N + n0;
    coopStoreT(acc0, &c[o], N);
    coopStoreT(acc1, &c[o + 16u], N);
    coopStoreT(acc2, &c[o + 32u], N);
    coopStoreT(acc3, &c[o + 48u], N);
}
"#;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096);
    let gpu = device::gpu().expect("a GPU");
    println!("{:#?}", gpu.info);
    if !gpu.info.coop_f16 {
        println!("no 16x16 f16 cooperative matrices here");
        return;
    }
    for &size in &[256usize, n] {
        let src = SRC.replace("{{N}}", &size.to_string());
        let pipe = gpu
            .pipeline(&format!("coop_probe{size}"), &src, true)
            .expect("compiles");
        let a: Vec<f32> = (0..size * size)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..size * size)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
            .collect();
        let buf = |data: &[f32]| {
            let bf = approx_attn::transfer::storage_buffer(&gpu, data.len(), "x");
            gpu.queue.write_buffer(&bf, 0, bytemuck::cast_slice(data));
            bf
        };
        let (ab, bb) = (buf(&a), buf(&b));
        let cb = buf(&vec![0.0; size * size]);
        let layout = pipe.get_bind_group_layout(0);
        let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &[&ab, &bb, &cb]
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: b.as_entire_binding(),
                })
                .collect::<Vec<_>>(),
        });
        let mut best = f64::INFINITY;
        let run = gpu.checked(|| {
            for _ in 0..5 {
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipe);
                    pass.set_bind_group(0, &bind, &[]);
                    pass.dispatch_workgroups((size / 64) as u32, (size / 64) as u32, 1);
                }
                let t = Instant::now();
                gpu.queue.submit([enc.finish()]);
                gpu.wait().expect("runs");
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(())
        });
        if let Err(e) = run {
            println!("n={size}: failed: {e}");
            continue;
        }
        let out = approx_attn::transfer::read_f32(&gpu, &cb, size * size).expect("reads");
        let mut max_err = 0f64;
        for &(i, j) in &[
            (0, 0),
            (1, 17),
            (size - 1, size - 1),
            (size / 2, 3),
            (37, size - 5),
        ] {
            let want: f64 = (0..size)
                .map(|k| f64::from(a[i * size + k]) * f64::from(b[k * size + j]))
                .sum();
            max_err = max_err.max((want - f64::from(out[i * size + j])).abs());
        }
        let tflops = 2.0 * (size as f64).powi(3) / best / 1e12;
        println!(
            "n={size}: {best:.4} s, {tflops:.1} TFLOP/s, max |err| at 5 entries {max_err:.2e}"
        );
    }
}
