//! The planners, cost models and I/O counts with sizes anywhere up to 2^64 - 1 (they come from
//! Python): each answers or returns an error, never panics. Built as a test, integer overflow
//! checks are on, so an intermediate that would wrap in a release build panics here.

use std::panic::{catch_unwind, AssertUnwindSafe};

use approx_attn::budget::Budget;
use approx_attn::exact::cost::exact_flops;
use approx_attn::exact::io::exact_io_checked;
use approx_attn::exact::plan::{exact_candidates, plan_exact};
use approx_attn::exact::storage::Storage;
use approx_attn::poly::causal::{causal_io, causal_passes_io, causal_poly_flops, plan_causal};
use approx_attn::poly::cost::poly_flops;
use approx_attn::poly::io::{poly_io, prepass_io};
use approx_attn::poly::plan::{plan_poly, plan_poly_coop, poly_candidates};
use approx_attn::{io_cost, io_lower_bound, Method, Problem};

const HUGE: [usize; 6] = [
    (1 << 31) + 1,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) + 12345,
    usize::MAX,
];

/// Everything a Problem of these sizes is planned and counted with, under `budget`.
fn plan_everything(p: &Problem, budget: &Budget) {
    let _ = p.input_lengths();
    // Every entry point checks the sizes first (`Problem::check_sizes`).
    if p.check_sizes().is_err() {
        return;
    }
    let _ = exact_flops(p);
    let _ = exact_candidates(p, budget);
    let fm = budget.fast_memory_words;
    for method in [Method::Exact, Method::Poly] {
        let degree = (method == Method::Poly).then_some(2);
        let _ = io_cost(p, method, degree, None, None, Some(fm), Storage::F32);
        let _ = io_lower_bound(p.l, p.s, p.e, method, degree, fm);
    }
    let _ = io_cost(
        p,
        Method::Poly,
        None,
        Some(1e-3),
        Some(1.0),
        Some(fm),
        Storage::F32,
    );
    let Ok(exact) = plan_exact(p, budget) else {
        return;
    };
    let _ = exact_io_checked(p, &exact, Storage::F32);
    let _ = prepass_io(p, &exact.chunking, budget);
    for g in 0..=3 {
        let _ = plan_poly_coop(p, g, budget, 32);
        let Ok(plan) = plan_poly(p, g, budget) else {
            continue;
        };
        let _ = poly_io(p, &plan, &exact.chunking, budget);
        let _ = poly_flops(p, &plan);
        let _ = poly_candidates(&plan, budget);
        if let Ok(cp) = plan_causal(p, &plan, budget) {
            let _ = causal_io(p, &cp, &exact.chunking, budget);
            let _ = causal_poly_flops(p, &cp);
            let _ = causal_passes_io(p, &cp, false);
            let _ = causal_passes_io(p, &cp, true);
        }
    }
}

#[test]
fn huge_sizes_plan_or_fail_without_panicking() {
    let budgets = [
        Budget::model(8192),
        Budget::model(1 << 62),
        Budget::with_binding(4096, 128 << 20),
        Budget {
            max_loop_iterations: 60_000,
            ..Budget::with_binding(8192, 2 << 30)
        },
    ];
    let small = [1usize, 3, 64];
    let mut problems = Vec::new();
    // One size huge at a time, then pairs, every other size small.
    for dim in 0..6 {
        for &h in &HUGE {
            for &s in &small {
                let mut sizes = [s; 6];
                sizes[dim] = h;
                problems.push(sizes);
                let mut pair = sizes;
                pair[(dim + 1) % 6] = h;
                problems.push(pair);
            }
        }
    }
    let mut failures = Vec::new();
    for sizes in problems {
        for causal in [false, true] {
            let [units, group, l, s, e, ev] = sizes;
            let p = Problem {
                units,
                group,
                l,
                s,
                e,
                ev,
                causal,
                scale: 0.125,
            };
            for budget in &budgets {
                if let Err(e) = catch_unwind(AssertUnwindSafe(|| plan_everything(&p, budget))) {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{p:?} with {budget:?}: {msg}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} panics, the first: {}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
