//! The exact kernel's WGSL, generated from `shaders/exact.wgsl` and its tiles, and its parameters.

use std::fmt::Write as _;

use super::plan::ExactTiles;
use crate::wgsl::{constant_loop, fill_template, io_counter_slots, wgsl_element, Emitter};

pub(crate) const TEMPLATE: &str = include_str!("../../shaders/exact.wgsl");

/// Most prefetch registers (floats per thread, K and V) with which the next K tile is loaded
/// early (see `shader_source`).
const EARLY_K_PREFETCH_FLOATS: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
/// Parameters of the exact kernel (`shaders/exact.wgsl`).
pub(crate) struct Params {
    /// Query rows in this dispatch.
    pub(crate) l: u32,
    /// Key rows in this dispatch.
    pub(crate) s: u32,
    /// Query heads per KV head.
    pub(crate) group: u32,
    pub(crate) causal: u32,
    /// Global index of this dispatch's first query row (causal mask).
    pub(crate) q_offset: u32,
    /// Global index of this dispatch's first key row.
    pub(crate) kv_offset: u32,
    /// 1 when the keys are split over dispatches: store (m, l) per row.
    pub(crate) write_stats: u32,
    /// scale * log2(e): scores go straight to exp2.
    pub(crate) scale_log2: f32,
}

/// The WGSL of the exact kernel for these tiles, micro-tiles unrolled into named registers. Tile
/// elements are vec4 where both widths allow (`ExactTiles::lanes`): 16-byte loads from workgroup
/// memory, four multiply-adds per loaded pair.
pub fn shader_source(t: &ExactTiles, count_io: bool) -> String {
    let g = Gen::new(t);
    let (elem, _) = wgsl_element(g.lanes);
    let (p_elem, _) = wgsl_element(t.p_lanes());
    let (k_store, v_store) = g.tile_stores();
    // The next K tile is loaded early (with V, right after the first barrier) when the whole
    // prefetch fits in EARLY_K_PREFETCH_FLOATS registers. Measured on the H100 (n = 65,536, 8
    // heads, tuned 32 x 32 tiles of 128 threads): early took 0.496 s instead of 0.515 s at E = 64
    // (32 floats of prefetch), but 1.040 s instead of 1.026 s at E = 128 (64 floats).
    let early = (g.nk + g.nv) * g.lanes <= EARLY_K_PREFETCH_FLOATS;
    let [decl, add] = io_counter_slots(count_io, 6);
    fill_template(
        TEMPLATE,
        &[
            ("E", t.e.to_string()),
            ("EV", t.ev.to_string()),
            ("BQ", t.bq.to_string()),
            ("BK", t.bk.to_string()),
            ("TQ", t.tq.to_string()),
            ("TK", t.tk.to_string()),
            ("WG", g.wg.to_string()),
            ("ELEM", elem.to_string()),
            ("LANES", g.lanes.to_string()),
            ("Q_TILE", (t.bq * t.row_stride()).to_string()),
            ("KV_TILE", t.kv_elements().to_string()),
            ("P_ELEM", p_elem.to_string()),
            ("PS", t.p_row_stride().to_string()),
            ("P_TILE", (t.bq * t.p_row_stride()).to_string()),
            ("PART", (t.bq * t.tk).to_string()),
            ("O_DECL", g.output_registers().trim_end().to_string()),
            (
                "PREFETCH_DECL",
                g.prefetch_registers().trim_end().to_string(),
            ),
            ("LOAD_FIRST", g.tile_load("0u", 2, t.split_v)),
            ("SPLIT_V", t.split_v.to_string()),
            ("EARLY_K", early.to_string()),
            ("K_TILE", (t.bk * t.row_stride()).to_string()),
            ("V_BUFFER", t.v_buffer_elements().to_string()),
            ("K_STORE", k_store.trim_end().to_string()),
            ("V_STORE", v_store.trim_end().to_string()),
            ("NEXT_KV_LOAD", g.tile_load("j0 + BK", 4, true)),
            (
                "V_LOAD",
                g.v_loads("j0", "k_rows", 3).trim_end().to_string(),
            ),
            ("NEXT_K_LOAD", g.tile_load("j0 + BK", 4, false)),
            ("SCORES", g.scores().trim_end().to_string()),
            ("SOFTMAX", g.softmax().trim_end().to_string()),
            ("PV", g.pv()),
            ("ROW_SUMS", g.row_sums().trim_end().to_string()),
            ("STORE", g.store().trim_end().to_string()),
            decl,
            add,
        ],
    )
}

/// The shape of a thread's work under these tiles, from which each slot's code is written.
struct Gen<'a> {
    t: &'a ExactTiles,
    /// Query rows and keys of a thread's score micro-tile.
    rq: usize,
    rk: usize,
    /// Floats per tile element (1 or 4).
    lanes: usize,
    /// Output column elements per thread.
    cv: usize,
    wg: usize,
    /// Elements per row of the K and V tiles.
    ew: usize,
    /// Prefetch registers per thread of the K and V tiles: element u of a thread's prefetch is
    /// tile element lid + WG * u (row-major, unpadded).
    nk: usize,
    nv: usize,
}

impl<'a> Gen<'a> {
    fn new(t: &'a ExactTiles) -> Self {
        let lanes = t.lanes();
        let wg = t.threads();
        let (ew, evw) = (t.e / lanes, t.ev / lanes);
        Gen {
            t,
            rq: t.rows_per_thread(),
            rk: t.keys_per_thread(),
            lanes,
            cv: t.out_cols_per_thread() / lanes,
            wg,
            ew,
            nk: (t.bk * ew).div_ceil(wg),
            nv: (t.bk * evw).div_ceil(wg),
        }
    }

    /// Query row of register row `a`.
    fn row(&self, a: usize) -> String {
        format!("(tq + {}u)", a * self.t.tq)
    }

    /// Running max, sum and output accumulators of each of the thread's rows.
    fn output_registers(&self) -> String {
        let mut o_decl = String::new();
        for a in 0..self.rq {
            let _ = writeln!(o_decl, "    var m_{a} = NEG;\n    var l_{a} = 0.0;");
            for u in 0..self.cv {
                let _ = writeln!(o_decl, "    var o_{a}_{u} = T();");
            }
        }
        o_decl
    }

    fn prefetch_registers(&self) -> String {
        let mut pre_decl = String::new();
        for u in 0..self.nk {
            let _ = writeln!(pre_decl, "    var kx_{u} = T();");
        }
        for u in 0..self.nv {
            let _ = writeln!(pre_decl, "    var vx_{u} = T();");
        }
        pre_decl
    }

    /// V rows `rows` of the tile at key `j0` into the vx registers, `depth` levels deep.
    fn v_loads(&self, j0: &str, rows: &str, depth: usize) -> String {
        let mut e = Emitter::new(depth);
        self.emit_v_loads(&mut e, j0, rows);
        let text = e.finish();
        if text.is_empty() {
            text
        } else {
            text + "\n"
        }
    }

    fn emit_v_loads(&self, e: &mut Emitter, j0: &str, rows: &str) {
        for u in 0..self.nv {
            let o = self.wg * u;
            e.line(format!("vx_{u} = T();"));
            e.block(format!("if (lid + {o}u < {rows} * EVW)"), |e| {
                e.line(format!("vx_{u} = v[v_base + ({j0}) * EVW + lid + {o}u];"));
                e.line("words_read += LANES;");
            });
        }
    }

    /// The K tile at key `j0` (and its V tile with `with_v`) into the registers, `depth` levels
    /// deep.
    fn tile_load(&self, j0: &str, depth: usize, with_v: bool) -> String {
        let mut e = Emitter::new(depth);
        e.line(format!("let kr = min(BK, kv_end - ({j0}));"));
        for u in 0..self.nk {
            let o = self.wg * u;
            e.line(format!("kx_{u} = T();"));
            e.block(format!("if (lid + {o}u < kr * EW)"), |e| {
                e.line(format!("kx_{u} = k[k_base + ({j0}) * EW + lid + {o}u];"));
                e.line("words_read += LANES;");
            });
        }
        if with_v {
            self.emit_v_loads(&mut e, j0, "kr");
        }
        e.finish()
    }

    /// The stores of the K registers into the tile, and of the V registers (one level deeper:
    /// the template stores V under a switch).
    fn tile_stores(&self) -> (String, String) {
        let mut k = Emitter::new(2);
        for u in 0..self.nk {
            let o = self.wg * u;
            k.block(format!("if (lid + {o}u < BK * EW)"), |e| {
                e.line(format!("let idx = lid + {o}u;"));
                e.line(format!("kv_tile[(idx / EW) * KS + idx % EW] = kx_{u};"));
            });
        }
        let mut v = Emitter::new(3);
        for u in 0..self.nv {
            let o = self.wg * u;
            v.block(format!("if (lid + {o}u < BK * EVW)"), |e| {
                e.line(format!("kv_tile[vbase + lid + {o}u] = vx_{u};"));
            });
        }
        (k.finish(), v.finish())
    }

    /// Scores stay in registers, masked entries at NEG; each thread posts its partial row maxima.
    fn scores(&self) -> String {
        let (t, rq, rk) = (self.t, self.rq, self.rk);
        let (_, comps) = wgsl_element(self.lanes);
        let mut scores = String::new();
        for a in 0..rq {
            for b in 0..rk {
                let _ = writeln!(scores, "        var s_{a}_{b} = 0.0;");
            }
        }
        let mut step = String::new();
        for a in 0..rq {
            let _ = writeln!(
                step,
                "            let q_{a} = q_tile[{} * QS + e];",
                self.row(a)
            );
        }
        for b in 0..rk {
            let _ = writeln!(
                step,
                "            let k_{b} = kv_tile[(tk + {}u) * KS + e];",
                b * t.tk
            );
        }
        for c in comps {
            for a in 0..rq {
                for b in 0..rk {
                    let _ = writeln!(
                        step,
                        "            s_{a}_{b} = fma(q_{a}{c}, k_{b}{c}, s_{a}_{b});"
                    );
                }
            }
        }
        scores.push_str(&constant_loop("        ", "e", ("EW", self.ew), &step));
        scores.push('\n');
        for a in 0..rq {
            for b in 0..rk {
                let _ = writeln!(
                    scores,
                    "        s_{a}_{b} = select(NEG, s_{a}_{b}, tk + {jb}u < k_rows && (params.causal == 0u || \
                     params.kv_offset + j0 + tk + {jb}u <= params.q_offset + q0 + {i}));",
                    jb = b * t.tk,
                    i = self.row(a)
                );
            }
            let mx = (1..rk).fold(format!("s_{a}_0"), |acc, b| {
                format!("max({acc}, s_{a}_{b})")
            });
            let _ = writeln!(scores, "        part[{} * TK + tk] = {mx};", self.row(a));
        }
        scores
    }

    /// Online softmax on the thread's own scores: the row maximum from the posted partials, the
    /// rescale of its accumulators, P for the P V product.
    fn softmax(&self) -> String {
        let (t, rk) = (self.t, self.rk);
        let p4 = t.p_lanes() == 4;
        let mut softmax = String::new();
        for a in 0..self.rq {
            let _ = writeln!(
                softmax,
                "        {{\n            var mx = m_{a};\n            for (var t = 0u; t < TK; t++) {{\n                \
                 mx = max(mx, part[{r} * TK + t]);\n            }}\n            \
                 let alpha = exp2(m_{a} - mx);\n            m_{a} = mx;",
                r = self.row(a)
            );
            for b in 0..rk {
                let target = if p4 {
                    format!(
                        "p_tile[{r} * PS + (tk + {jb}u) / 4u][(tk + {jb}u) % 4u]",
                        r = self.row(a),
                        jb = b * t.tk
                    )
                } else {
                    format!(
                        "p_tile[{r} * PS + tk + {jb}u]",
                        r = self.row(a),
                        jb = b * t.tk
                    )
                };
                let _ = writeln!(
                    softmax,
                    "            let p_{b} = select(0.0, exp2(s_{a}_{b} - mx), s_{a}_{b} > NEG);\n            \
                     {target} = p_{b};"
                );
            }
            let sum = (0..rk)
                .map(|b| format!("p_{b}"))
                .collect::<Vec<_>>()
                .join(" + ");
            let _ = writeln!(softmax, "            l_{a} = l_{a} * alpha + ({sum});");
            for u in 0..self.cv {
                let _ = writeln!(softmax, "            o_{a}_{u} *= alpha;");
            }
            softmax.push_str("        }\n");
        }
        softmax
    }

    /// The P V product. Element columns of a thread: tk + u * TK (consecutive threads read
    /// consecutive elements). With a vec4 P tile, one load brings the probabilities of four keys.
    fn pv(&self) -> String {
        let t = self.t;
        let (_, p_comps) = wgsl_element(t.p_lanes());
        let p_step = p_comps.len();
        let mut step = String::new();
        for a in 0..self.rq {
            let _ = writeln!(
                step,
                "            let p_{a} = p_tile[{} * PS + jp];",
                self.row(a)
            );
        }
        for (l, pc) in p_comps.iter().enumerate() {
            for u in 0..self.cv {
                let _ = writeln!(
                    step,
                    "            let v_{l}_{u} = kv_tile[vbase + ({p_step}u * jp + {l}u) * EVW + tk + {}u];",
                    u * t.tk
                );
            }
            for a in 0..self.rq {
                for u in 0..self.cv {
                    let _ = writeln!(
                        step,
                        "            o_{a}_{u} = fma(T(p_{a}{pc}), v_{l}_{u}, o_{a}_{u});"
                    );
                }
            }
        }
        let pv_steps = format!("BK / {p_step}u");
        constant_loop("        ", "jp", (&pv_steps, t.bk / p_step), &step)
    }

    /// Each thread's partial sums of its rows, for the row sums after the barrier.
    fn row_sums(&self) -> String {
        let mut s = String::new();
        for a in 0..self.rq {
            let _ = writeln!(s, "    part[{} * TK + tk] = l_{a};", self.row(a));
        }
        s
    }

    /// Row sums: the TK partial sums of each row (posted before the template's barrier); then
    /// the normalised output rows and, for split keys, their statistics.
    fn store(&self) -> String {
        let t = self.t;
        let (_, comps) = wgsl_element(self.lanes);
        let mut store = String::new();
        for a in 0..self.rq {
            let _ = writeln!(
                store,
                "    {{\n        let i = {r};\n        var li = 0.0;\n        for (var t = 0u; t < TK; t++) {{\n            \
                 li += part[i * TK + t];\n        }}",
                r = self.row(a)
            );
            for u in 0..self.cv {
                let _ = writeln!(
                    store,
                    "        if (i < q_rows && tk + {cu}u < EVW) {{",
                    cu = u * t.tk
                );
                for (l, c) in comps.iter().enumerate() {
                    let _ = writeln!(
                        store,
                        "            o[(head * params.l + q0 + i) * EV + LANES * (tk + {cu}u) + {l}u] = \
                         select(0.0, o_{a}_{u}{c} / li, li > 0.0);",
                        cu = u * t.tk
                    );
                }
                let _ = writeln!(store, "            words_written += LANES;\n        }}");
            }
            let _ = writeln!(
                store,
                "        if (params.write_stats != 0u && tk == 0u && i < q_rows) {{\n            \
                 let srow = (head * params.l + q0 + i) * 2u;\n            stats[srow] = m_{a};\n            \
                 stats[srow + 1u] = li;\n            words_written += 2u;\n        }}\n    }}"
            );
        }
        store
    }
}
