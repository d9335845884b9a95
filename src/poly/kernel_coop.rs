//! WGSL of the tensor-core poly passes (16x16 f16 cooperative matrices, f32 accumulators) and of
//! the pack of S' into f16, generated from `shaders/poly_coop_*.wgsl` and their tiles.

use std::fmt::Write as _;

use super::features::index_words;
use super::kernel_common::{
    element_registers, feature_product, pass1_prefetch, pass2_feature_build, table_prefetch,
    Prefetch,
};
use super::plan::{align4, CoopTiles, AUX_THREADS, COOP_PASS2_ROWS_PER_THREAD};
use crate::wgsl::{fill_fragment, fill_template, io_counter_slots, wgsl_element, Emitter};

const STORE_VEC4: &str = include_str!("../../shaders/poly_coop_pass1_store_vec4.wgsl");

pub(crate) const COOP_PASS1: &str = include_str!("../../shaders/poly_coop_pass1.wgsl");

pub(crate) const COOP_PASS2: &str = include_str!("../../shaders/poly_coop_pass2.wgsl");

const COOP_PASS1_STORE: &str = include_str!("../../shaders/poly_coop_pass1_store.wgsl");

const COOP_PASS2_STORE: &str = include_str!("../../shaders/poly_coop_pass2_store.wgsl");

pub(crate) const COOP_PACK: &str = include_str!("../../shaders/poly_coop_pack.wgsl");

/// Zeroed 16 x 16 accumulators `acc_a_c` of a subgroup's `rows` row tiles and `cols` column tiles,
/// loaded from a zeroed workgroup tile: naga writes `coop_mat16x16<f32, C>()` as OpConstantNull,
/// which gave garbage on the H100's driver.
fn coop_accumulators(rows: usize, cols: usize, depth: usize) -> String {
    let mut e = Emitter::new(depth);
    for a in 0..rows {
        for c in 0..cols {
            e.line(format!(
                "var acc_{a}_{c} = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);"
            ));
        }
    }
    e.finish()
}

/// One 16-deep step of the subgroup's products: its row tiles of `a_tile` (workgroup memory,
/// stride `a_stride`) times every column tile `b_at(c)` (stride `b_stride`) at depth kk.
fn coop_mma(
    (rows, cols): (usize, usize),
    (a_tile, a_stride): (&str, &str),
    (b_at, b_stride): (impl Fn(usize) -> String, &str),
    depth: usize,
) -> String {
    let mut e = Emitter::new(depth);
    // The A tiles are stored depth-major (column-major): element (row, kk) at kk * stride + row.
    for a in 0..rows {
        e.line(format!(
            "let a_{a} = coopLoad<coop_mat16x16<f16, A>>(&{a_tile}[kk * {a_stride} + (sg * RT + {a}u) * 16u], {a_stride});"
        ));
    }
    for c in 0..cols {
        e.line(format!(
            "let b_{c} = coopLoadT<coop_mat16x16<f16, B>>(&{}, {b_stride});",
            b_at(c)
        ));
        for a in 0..rows {
            e.line(format!(
                "acc_{a}_{c} = coopMultiplyAdd(a_{a}, b_{c}, acc_{a}_{c});"
            ));
        }
    }
    e.finish()
}

/// Writes each accumulator through the subgroup's staging tile: `fragment` (a template of the
/// pass's store) once per accumulator, row tile A and column tile C (value columns from COL).
fn coop_store((rows, cols): (usize, usize), fragment: &str) -> String {
    let mut s = String::new();
    for a in 0..rows {
        for c in 0..cols {
            s.push_str(&fill_fragment(
                fragment,
                &[
                    ("A", a.to_string()),
                    ("C", c.to_string()),
                    ("COL", (16 * c).to_string()),
                ],
            ));
        }
    }
    s.trim_end().to_string()
}

/// Whether pass 1 reads keys and values as vec4 (both widths multiples of 4).
fn coop_vec4(t: &CoopTiles) -> bool {
    t.e % 4 == 0 && t.ev % 4 == 0
}

/// Pass 1's key tile: element u of each thread is tile element `lid + WG * u` (of BK x (E+1)
/// keys, BK x Ev values).
fn coop_prefetch(t: &CoopTiles) -> Prefetch {
    if coop_vec4(t) {
        return coop_prefetch_vec4(t);
    }
    let wg = t.threads();
    let (nk, nv) = ((t.bk * (t.e + 1)).div_ceil(wg), (t.bk * t.ev).div_ceil(wg));
    let mut decl = String::new();
    element_registers(&mut decl, ["ki", "krow", "kcol", "kx"], (nk, wg), "E1");
    element_registers(&mut decl, ["vi", "vrow", "vcol", "vx"], (nv, wg), "EV");
    let load = |j0: &str, depth: usize| {
        let mut e = Emitter::new(depth);
        e.scope(|e| {
            e.line(format!("let kr = min(BK, j_end - ({j0}));"));
            for u in 0..nk {
                e.line(format!("kx_{u} = 0.0;"));
                e.block(format!("if (ki_{u} < BK * E1 && krow_{u} < kr)"), |e| {
                    e.line(format!("kx_{u} = 1.0;"));
                    e.block(format!("if (kcol_{u} < E)"), |e| {
                        e.line(format!(
                            "kx_{u} = (k[(unit * params.s + {j0} + krow_{u}) * E + kcol_{u}] - \
                             mu_t[kcol_{u}]) * params.k_inv_scale;"
                        ));
                        e.line("words_read += 1u;");
                    });
                });
            }
            for u in 0..nv {
                e.line(format!("vx_{u} = 0.0;"));
                e.block(format!("if (vi_{u} < BK * EV && vrow_{u} < kr)"), |e| {
                    e.line(format!(
                        "vx_{u} = (v[(unit * params.s + {j0} + vrow_{u}) * EV + vcol_{u}] - \
                         vn_t[vcol_{u}]) * vn_t[EV + vcol_{u}];"
                    ));
                    e.line("words_read += 1u;");
                });
            }
        });
        e.finish()
    };
    let mut store = Emitter::new(2);
    for u in 0..nk {
        store.block(format!("if (ki_{u} < BK * E1)"), |e| {
            e.line(format!("k_t[kcol_{u} * KS + krow_{u}] = kx_{u};"));
        });
    }
    for u in 0..nv {
        store.block(format!("if (vi_{u} < BK * EV)"), |e| {
            e.line(format!("v_t[vrow_{u} * VS + vcol_{u}] = f16(vx_{u});"));
        });
    }
    pass1_prefetch(&decl, load, &store.finish())
}

/// Pass 1's key tile read as vec4: element u of each thread is vec4 `lid + WG * u` of the BK x E
/// keys and of the BK x Ev values. A thread's columns are the same in every tile, so their mean
/// and value normalisation stay in registers; the constant-1 row is written per tile.
fn coop_prefetch_vec4(t: &CoopTiles) -> Prefetch {
    let wg = t.threads();
    let (e4, ev4) = (t.e / 4, t.ev / 4);
    let (nk, nv) = ((t.bk * e4).div_ceil(wg), (t.bk * ev4).div_ceil(wg));
    let lanes = |name: &str, base: &str, at: &str| {
        format!(
            "vec4<f32>({name}[{base}4u * {at}], {name}[{base}4u * {at} + 1u], {name}[{base}4u * {at} + 2u], {name}[{base}4u * {at} + 3u])"
        )
    };
    let mut decl = String::from("    var kr_t = 0u; // keys of the tile held in registers\n");
    for u in 0..nk {
        let _ = writeln!(
            decl,
            "    let ki_{u} = lid + {o}u;\n    let krow_{u} = ki_{u} / {e4}u;\n    let kc_{u} = ki_{u} % {e4}u;\n    \
             let kmu_{u} = {mu};\n    var kx_{u} = vec4<f32>();",
            o = wg * u,
            mu = lanes("mu_t", "", &format!("kc_{u}"))
        );
    }
    for u in 0..nv {
        let _ = writeln!(
            decl,
            "    let vi_{u} = lid + {o}u;\n    let vrow_{u} = vi_{u} / {ev4}u;\n    let vc_{u} = vi_{u} % {ev4}u;\n    \
             let vmin_{u} = {lo};\n    let vinv_{u} = {inv};\n    var vx_{u} = vec4<f32>();",
            o = wg * u,
            lo = lanes("vn_t", "", &format!("vc_{u}")),
            inv = lanes("vn_t", "EV + ", &format!("vc_{u}"))
        );
    }
    let load = |j0: &str, depth: usize| {
        let mut e = Emitter::new(depth);
        e.scope(|e| {
            e.line(format!("kr_t = min(BK, j_end - ({j0}));"));
            for u in 0..nk {
                e.line(format!("kx_{u} = vec4<f32>();"));
                e.block(
                    format!("if (ki_{u} < BK * {e4}u && krow_{u} < kr_t)"),
                    |e| {
                        e.line(format!(
                            "kx_{u} = (k[(unit * params.s + {j0} + krow_{u}) * {e4}u + kc_{u}] - \
                         kmu_{u}) * params.k_inv_scale;"
                        ));
                        e.line("words_read += 4u;");
                    },
                );
            }
            for u in 0..nv {
                e.line(format!("vx_{u} = vec4<f32>();"));
                e.block(
                    format!("if (vi_{u} < BK * {ev4}u && vrow_{u} < kr_t)"),
                    |e| {
                        e.line(format!(
                            "vx_{u} = (v[(unit * params.s + {j0} + vrow_{u}) * {ev4}u + vc_{u}] - \
                         vmin_{u}) * vinv_{u};"
                        ));
                        e.line("words_read += 4u;");
                    },
                );
            }
        });
        e.finish()
    };
    let mut stores = Emitter::new(2);
    for u in 0..nk {
        stores.block(format!("if (ki_{u} < BK * {e4}u)"), |e| {
            e.line(format!("let c = 4u * kc_{u};"));
            for (l, x) in wgsl_element(4).1.iter().enumerate() {
                e.line(format!("k_t[(c + {l}u) * KS + krow_{u}] = kx_{u}{x};"));
            }
        });
    }
    for u in 0..nv {
        stores.block(format!("if (vi_{u} < BK * {ev4}u)"), |e| {
            e.line(format!("let c = vrow_{u} * VS + 4u * vc_{u};"));
            for (l, x) in wgsl_element(4).1.iter().enumerate() {
                e.line(format!("v_t[c + {l}u] = f16(vx_{u}{x});"));
            }
        });
    }
    let store = fill_fragment(STORE_VEC4, &[("STORES", stores.finish())]);
    pass1_prefetch(&decl, load, &store)
}

/// Template slots both coop passes share; `(threads, rt)` are the pass's own.
fn coop_common_slots(t: &CoopTiles, (threads, rt): (usize, usize)) -> Vec<(&'static str, String)> {
    vec![
        ("E", t.e.to_string()),
        ("EV", t.ev.to_string()),
        ("EVP", t.padded_ev().to_string()),
        ("R", t.r.to_string()),
        ("G", t.g.to_string()),
        ("IW", index_words(t.g).to_string()),
        ("WG", threads.to_string()),
        ("SG", t.sg.to_string()),
        ("RT", rt.to_string()),
        ("VN", align4(2 * t.ev).to_string()),
    ]
}

/// Pass 1 on cooperative matrices for these tiles.
pub fn coop_pass1_source(t: &CoopTiles, count_io: bool) -> String {
    let iw = index_words(t.g);
    let (rt, ct) = (t.rt1, t.col_tiles());
    let index_decl: String = (0..t.g)
        .map(|i| format!("    let i_{i} = feature_index(fb, {i}u);\n"))
        .collect();
    let store = coop_store((rt, ct), COOP_PASS1_STORE);
    let pre = coop_prefetch(t);
    let [decl, add] = io_counter_slots(count_io, 7);
    let mut slots = coop_common_slots(t, (t.threads(), rt));
    slots.extend([
        ("STAGE", (t.subgroups * 256).to_string()),
        ("RC", t.rc1().to_string()),
        ("BK", t.bk.to_string()),
        (
            "KV_TYPE",
            wgsl_element(if coop_vec4(t) { 4 } else { 1 }).0.to_string(),
        ),
        ("K_TILE", align4((t.e + 1) * (t.bk + 1)).to_string()),
        ("V_TILE", (t.bk * (t.padded_ev() + 8)).to_string()),
        ("PHI", (t.bk * (t.rc1() + 8)).to_string()),
        ("IDX", align4(t.rc1() * iw).to_string()),
        ("MU", align4(t.e).to_string()),
        ("INDEX_DECL", index_decl.trim_end().to_string()),
        ("PREFETCH_DECL", pre.decl),
        ("PREFETCH_LOAD_FIRST", pre.first),
        ("PREFETCH_LOAD_NEXT", pre.next),
        ("PREFETCH_STORE", pre.store),
        (
            "FEATURE",
            feature_product(t.g, |i| format!("k_t[i_{i} * KS + j]"), "k_t[E * KS + j]"),
        ),
        ("ACC_DECL", coop_accumulators(rt, ct, 1)),
        (
            "MMA",
            coop_mma(
                (rt, ct),
                ("phi", "FS"),
                (|c| format!("v_t[kk * VS + {}u]", 16 * c), "VS"),
                3,
            ),
        ),
        ("STORE", store),
        decl,
        add,
    ]);
    fill_template(COOP_PASS1, &slots)
}

/// Pass 2's S'' chunk (vec4 of halves; element u of a thread is vec4 `lid + WG * u` of the
/// chunk's RC x EVP halves) and its stores into `s_t`.
fn coop_chunk_prefetch(t: &CoopTiles) -> Prefetch {
    let wg = t.threads2();
    let n4 = (t.rc2 * t.padded_ev() / 4).div_ceil(wg);
    let mut decl = Emitter::new(2);
    for u in 0..n4 {
        decl.line(format!("let si_{u} = lid + {}u;", wg * u));
        decl.line(format!("var sx_{u} = vec4<f16>();"));
    }
    let load = |f0: &str, depth: usize| {
        let mut e = Emitter::new(depth);
        for u in 0..n4 {
            e.block(format!("if (si_{u} < RC * EVP / 4u)"), |e| {
                e.line(format!(
                    "sx_{u} = s16[(unit * RP + {f0}) * EVP / 4u + si_{u}];"
                ));
                e.line("words_read += 2u;");
            });
        }
        e.finish()
    };
    let mut store = Emitter::new(3);
    for u in 0..n4 {
        store.block(format!("if (si_{u} < RC * EVP / 4u)"), |e| {
            e.line(format!(
                "let so = (si_{u} * 4u) / EVP * SS + (si_{u} * 4u) % EVP;"
            ));
            for (l, c) in ["x", "y", "z", "w"].iter().enumerate() {
                let at = if l == 0 {
                    String::new()
                } else {
                    format!(" + {l}u")
                };
                e.line(format!("s_t[so{at}] = sx_{u}.{c};"));
            }
        });
    }
    Prefetch {
        decl: decl.finish(),
        first: load("0u", 2),
        next: load("f0 + RC", 4),
        store: store.finish(),
    }
}

/// Pass 2 on cooperative matrices for these tiles.
pub fn coop_pass2_source(t: &CoopTiles, count_io: bool) -> String {
    let (rt, ct) = (t.rt2, t.col_tiles());
    let store = coop_store((rt, ct), COOP_PASS2_STORE);
    let rpt = COOP_PASS2_ROWS_PER_THREAD;
    let build = pass2_feature_build(
        (rpt, t.g),
        ("q_t", "d"),
        |row, p| format!("phi[f * FS + {row}] = f16({p})"),
        |row, d| format!("q_t[DT0 + fb * BQ + {row}] = {d}"),
    );
    let pre = coop_chunk_prefetch(t);
    let table = table_prefetch(t.threads2(), t.rc2, t.g, true);
    let [decl, add] = io_counter_slots(count_io, 8);
    let mut slots = coop_common_slots(t, (t.threads2(), rt));
    slots.extend([
        ("RC", t.rc2.to_string()),
        ("BQ", t.b2().to_string()),
        ("QS", t.q_stride2().to_string()),
        ("Q_TILE", t.pass2_query_tile_words().to_string()),
        ("DT0", (t.subgroups2 * 256).to_string()),
        ("PHI", (t.rc2 * (t.b2() + 8)).to_string()),
        ("RP", t.rp().to_string()),
        ("S_TILE", (t.rc2 * (t.padded_ev() + 8)).to_string()),
        ("S_LOAD_FIRST", format!("{}\n{}", pre.decl, pre.first)),
        ("S_LOAD_NEXT", pre.next),
        ("S_STORE", pre.store),
        (
            "TABLE_LOAD_FIRST",
            format!("{}\n{}", table.decl, table.first),
        ),
        ("TABLE_LOAD_NEXT", table.next),
        ("TABLE_STORE", table.store),
        ("IDX", align4(t.rc2 * t.g.max(1)).to_string()),
        ("FEATURE_INDEX", build.index),
        ("RPT", rpt.to_string()),
        ("D_DECL", build.d_decl),
        ("FEATURE", build.feature),
        // The partials go into the query tile: the template's barrier before D_STORE keeps
        // every thread past the feature build.
        ("D_STORE", build.d_store),
        ("ACC_DECL", coop_accumulators(rt, ct, 2)),
        (
            "MMA",
            coop_mma(
                (rt, ct),
                ("phi", "FS"),
                (|c| format!("s_t[kk * SS + {}u]", 16 * c), "SS"),
                4,
            ),
        ),
        ("STORE", store),
        decl,
        add,
    ]);
    fill_template(COOP_PASS2, &slots)
}

/// Packs S' into the f16 S'' (and its f32 normaliser column) that coop pass 2 reads.
pub fn coop_pack_source(t: &CoopTiles, count_io: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 4);
    fill_template(
        COOP_PACK,
        &[
            ("R", t.r.to_string()),
            ("RP", t.rp().to_string()),
            ("EV", t.ev.to_string()),
            ("EVP", t.padded_ev().to_string()),
            ("WG", AUX_THREADS.to_string()),
            decl,
            add,
        ],
    )
}

/// Parameters of the pack of S' into f16 (`shaders/poly_coop_pack.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PackParams {
    /// 1 / key rows per unit.
    pub inv_keys: f32,
    pub _pad: [f32; 3],
}
