//! The exact kernel's WGSL, generated from `shaders/exact.wgsl` and its tiles, and its parameters.

use std::fmt::Write as _;

use super::plan::ExactTiles;
use super::storage::Storage;
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
    shader_source_for(t, count_io, Storage::F32)
}

/// [`shader_source`] for inputs stored in `storage`. The f16 variant reads Q, K and V packed two
/// halves to a u32 word and unpacks them (exactly) to f32 on their way to workgroup memory: from
/// there on it is the f32 kernel, whose results it gives bit for bit on the same values.
pub fn shader_source_for(t: &ExactTiles, count_io: bool, storage: Storage) -> String {
    let g = Gen::new(t, storage);
    let (elem, _) = wgsl_element(g.lanes);
    let (p_elem, _) = wgsl_element(t.p_lanes());
    let (k_store, v_store) = g.tile_stores();
    // The next K tile is loaded early (with V, right after the first barrier) when the whole
    // prefetch fits in EARLY_K_PREFETCH_FLOATS registers. Measured on the H100 (n = 65,536, 8
    // heads, tuned 32 x 32 tiles of 128 threads): early took 0.496 s instead of 0.515 s at E = 64
    // (32 floats of prefetch), but 1.040 s instead of 1.026 s at E = 128 (64 floats).
    let early = (g.nk + g.nv) * g.reg_words <= EARLY_K_PREFETCH_FLOATS;
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
            ("INPUT_DECL", g.input_decl()),
            ("IN_EW", g.ew_name.to_string()),
            ("IN_EVW", g.evw_name.to_string()),
            ("Q_LOAD", g.q_load()),
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
    /// storage element lid + WG * u of the tile (row-major, unpadded).
    nk: usize,
    nv: usize,
    storage: Storage,
    /// Row widths of Q/K and V in storage elements, their WGSL names, the type of a storage
    /// element (and of a prefetch register) and the words it takes.
    sew: usize,
    sevw: usize,
    ew_name: &'static str,
    evw_name: &'static str,
    reg: &'static str,
    reg_words: usize,
}

impl<'a> Gen<'a> {
    fn new(t: &'a ExactTiles, storage: Storage) -> Self {
        let lanes = t.lanes();
        let wg = t.threads();
        let (ew, evw) = (t.e / lanes, t.ev / lanes);
        // f16: a vec4 tile element is one vec2<u32> of storage; scalar elements go in pairs
        // (one u32 each, rows padded to whole words).
        let (sew, sevw, ew_name, evw_name, reg, reg_words) = match storage {
            Storage::F32 => (ew, evw, "EW", "EVW", "T", lanes),
            Storage::F16 if lanes == 4 => (ew, evw, "EWS", "EVWS", "S", 2),
            Storage::F16 => (
                storage.row_words(t.e),
                storage.row_words(t.ev),
                "EWS",
                "EVWS",
                "S",
                1,
            ),
        };
        Gen {
            t,
            rq: t.rows_per_thread(),
            rk: t.keys_per_thread(),
            lanes,
            cv: t.out_cols_per_thread() / lanes,
            wg,
            ew,
            nk: (t.bk * sew).div_ceil(wg),
            nv: (t.bk * sevw).div_ceil(wg),
            storage,
            sew,
            sevw,
            ew_name,
            evw_name,
            reg,
            reg_words,
        }
    }

    /// Words read per storage element, as the counter adds them.
    fn words_per_load(&self) -> String {
        match self.storage {
            Storage::F32 => "LANES".into(),
            Storage::F16 => format!("{}u", self.reg_words),
        }
    }

    /// The bindings of Q, K and V (and, for f16, their element type and unpacking).
    fn input_decl(&self) -> String {
        let elem = match self.storage {
            Storage::F32 => "T",
            Storage::F16 => "S",
        };
        let mut s = String::new();
        if self.storage == Storage::F16 {
            let packed = if self.lanes == 4 { "vec2<u32>" } else { "u32" };
            let _ = writeln!(
                s,
                "// Q, K and V are f16 in storage, two to a u32 word (the lower half first, rows padded to\n\
                 // whole words): S holds {h} of them, EWS and EVWS are the row widths of Q/K and V in S.\n\
                 alias S = {packed};\nconst EWS: u32 = {}u;\nconst EVWS: u32 = {}u;",
                self.sew,
                self.sevw,
                h = 2 * self.reg_words,
            );
            if self.lanes == 4 {
                s.push_str(
                    "fn unpack_t(w: S) -> T {\n    return T(unpack2x16float(w.x), unpack2x16float(w.y));\n}\n",
                );
            }
        }
        for (b, name) in [(1, "q"), (2, "k"), (3, "v")] {
            let _ = writeln!(
                s,
                "@group(0) @binding({b}) var<storage, read> {name}: array<{elem}>;"
            );
        }
        s.trim_end().to_string()
    }

    /// The query tile, scaled by scale * log2(e), into workgroup memory.
    fn q_load(&self) -> String {
        let mut e = Emitter::new(1);
        let w = self.ew_name;
        let count = format!("words_read += {};", self.words_per_load());
        let pairs = self.storage == Storage::F16 && self.lanes == 1;
        e.block(
            format!("for (var idx = lid; idx < BQ * {w}; idx += WG)"),
            |e| {
                let (zero, load) = match self.storage {
                    Storage::F32 => ("T()", "q[q_base + idx]".to_string()),
                    Storage::F16 if pairs => {
                        ("vec2<f32>()", "unpack2x16float(q[q_base + idx])".into())
                    }
                    Storage::F16 => ("T()", "unpack_t(q[q_base + idx])".into()),
                };
                e.line(format!("var x = {zero};"));
                e.block(format!("if (idx / {w} < q_rows)"), |e| {
                    e.line(format!("x = {load} * params.scale_log2;"));
                    e.line(&count);
                });
                if pairs {
                    e.line("let c = 2u * (idx % EWS);");
                    e.line("q_tile[(idx / EWS) * QS + c] = x.x;");
                    e.block("if (c + 1u < E)", |e| {
                        e.line("q_tile[(idx / EWS) * QS + c + 1u] = x.y;");
                    });
                } else {
                    e.line(format!("q_tile[(idx / {w}) * QS + idx % {w}] = x;"));
                }
            },
        );
        e.finish()
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
        let r = self.reg;
        for u in 0..self.nk {
            let _ = writeln!(pre_decl, "    var kx_{u} = {r}();");
        }
        for u in 0..self.nv {
            let _ = writeln!(pre_decl, "    var vx_{u} = {r}();");
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
        let (r, w) = (self.reg, self.evw_name);
        let count = format!("words_read += {};", self.words_per_load());
        for u in 0..self.nv {
            let o = self.wg * u;
            e.line(format!("vx_{u} = {r}();"));
            e.block(format!("if (lid + {o}u < {rows} * {w})"), |e| {
                e.line(format!("vx_{u} = v[v_base + ({j0}) * {w} + lid + {o}u];"));
                e.line(&count);
            });
        }
    }

    /// The K tile at key `j0` (and its V tile with `with_v`) into the registers, `depth` levels
    /// deep.
    fn tile_load(&self, j0: &str, depth: usize, with_v: bool) -> String {
        let mut e = Emitter::new(depth);
        let (r, w) = (self.reg, self.ew_name);
        let count = format!("words_read += {};", self.words_per_load());
        e.line(format!("let kr = min(BK, kv_end - ({j0}));"));
        for u in 0..self.nk {
            let o = self.wg * u;
            e.line(format!("kx_{u} = {r}();"));
            e.block(format!("if (lid + {o}u < kr * {w})"), |e| {
                e.line(format!("kx_{u} = k[k_base + ({j0}) * {w} + lid + {o}u];"));
                e.line(&count);
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
        let (w, vw) = (self.ew_name, self.evw_name);
        let pairs = self.storage == Storage::F16 && self.lanes == 1;
        let unpack = |x: String| match self.storage {
            Storage::F32 => x,
            Storage::F16 => format!("unpack_t({x})"),
        };
        // f16 pairs: two tile elements per register, the second only inside the row (the first
        // may be a pad half at an odd width's end).
        let pair = |e: &mut Emitter, reg: String, at: String, col: &str, width: &str| {
            e.line(format!("let h = unpack2x16float({reg});"));
            e.line(format!("let c = 2u * (idx % {col});"));
            e.line(format!("kv_tile[{at}] = h.x;"));
            e.block(format!("if (c + 1u < {width})"), |e| {
                e.line(format!("kv_tile[{at} + 1u] = h.y;"));
            });
        };
        let mut k = Emitter::new(2);
        for u in 0..self.nk {
            let o = self.wg * u;
            k.block(format!("if (lid + {o}u < BK * {w})"), |e| {
                e.line(format!("let idx = lid + {o}u;"));
                if pairs {
                    pair(
                        e,
                        format!("kx_{u}"),
                        "(idx / EWS) * KS + c".into(),
                        "EWS",
                        "E",
                    );
                } else {
                    e.line(format!(
                        "kv_tile[(idx / {w}) * KS + idx % {w}] = {};",
                        unpack(format!("kx_{u}"))
                    ));
                }
            });
        }
        let mut v = Emitter::new(3);
        for u in 0..self.nv {
            let o = self.wg * u;
            v.block(format!("if (lid + {o}u < BK * {vw})"), |e| {
                if pairs {
                    e.line(format!("let idx = lid + {o}u;"));
                    let at = "vbase + (idx / EVWS) * EVW + c".to_string();
                    pair(e, format!("vx_{u}"), at, "EVWS", "EV");
                } else {
                    e.line(format!(
                        "kv_tile[vbase + lid + {o}u] = {};",
                        unpack(format!("vx_{u}"))
                    ));
                }
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
        scores.push_str(&constant_loop(2, "e", ("EW", self.ew), &step));
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
        constant_loop(2, "jp", (&pv_steps, t.bk / p_step), &step)
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
