//! The exact kernel's WGSL, generated from `shaders/exact.wgsl` and its tiles, and its parameters.

use super::plan::ExactTiles;
use super::storage::Storage;
use crate::wgsl::{
    constant_loop, fill_fragment, fill_template, indent, io_counter_slots, wgsl_element, Emitter,
};

pub(crate) const TEMPLATE: &str = include_str!("../../shaders/exact.wgsl");
/// Fragments of the template (their first lines say where they go and what they are filled with).
const Q_PAIR_STORE: &str = include_str!("../../shaders/exact_q_pair_store.wgsl");
const PAIR_STORE: &str = include_str!("../../shaders/exact_pair_store.wgsl");
const SOFTMAX_ROW: &str = include_str!("../../shaders/exact_softmax_row.wgsl");
const STORE_ROW: &str = include_str!("../../shaders/exact_store_row.wgsl");

/// Most prefetch registers (floats per thread, K and V) with which the next K tile is loaded
/// early (see `Gen::size_slots`).
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
    let mut slots = g.size_slots();
    slots.extend(g.code_slots());
    slots.extend(io_counter_slots(count_io, 6));
    fill_template(TEMPLATE, &slots)
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

    /// The template's sizes and element types.
    fn size_slots(&self) -> Vec<(&'static str, String)> {
        let t = self.t;
        let (elem, _) = wgsl_element(self.lanes);
        let (p_elem, _) = wgsl_element(t.p_lanes());
        // The next K tile is loaded early (with V, right after the first barrier) when the whole
        // prefetch fits in EARLY_K_PREFETCH_FLOATS registers. Measured on the H100 (n = 65,536, 8
        // heads, tuned 32 x 32 tiles of 128 threads): early took 0.496 s instead of 0.515 s at
        // E = 64 (32 floats of prefetch), but 1.040 s instead of 1.026 s at E = 128 (64 floats).
        let early = (self.nk + self.nv) * self.reg_words <= EARLY_K_PREFETCH_FLOATS;
        vec![
            ("E", t.e.to_string()),
            ("EV", t.ev.to_string()),
            ("BQ", t.bq.to_string()),
            ("BK", t.bk.to_string()),
            ("TQ", t.tq.to_string()),
            ("TK", t.tk.to_string()),
            ("WG", self.wg.to_string()),
            ("ELEM", elem.to_string()),
            ("LANES", self.lanes.to_string()),
            ("Q_TILE", (t.bq * t.row_stride()).to_string()),
            ("KV_TILE", t.kv_elements().to_string()),
            ("P_ELEM", p_elem.to_string()),
            ("PS", t.p_row_stride().to_string()),
            ("P_TILE", (t.bq * t.p_row_stride()).to_string()),
            ("PART", (t.bq * t.tk).to_string()),
            ("SPLIT_V", t.split_v.to_string()),
            ("EARLY_K", early.to_string()),
            ("K_TILE", (t.bk * t.row_stride()).to_string()),
            ("V_BUFFER", t.v_buffer_elements().to_string()),
            ("IN_EW", self.ew_name.to_string()),
            ("IN_EVW", self.evw_name.to_string()),
            ("IN_WORDS", self.words_per_load()),
        ]
    }

    /// The template's generated code: declarations, and the unrolled loads, stores and products
    /// of the thread's registers.
    fn code_slots(&self) -> Vec<(&'static str, String)> {
        let (k_store, v_store) = self.tile_stores();
        let mut slots = vec![
            ("INPUT_DECL", self.input_decl()),
            ("O_DECL", self.output_registers()),
            ("PREFETCH_DECL", self.prefetch_registers()),
            ("LOAD_FIRST", self.tile_load("0u", 2, self.t.split_v)),
            ("K_STORE", k_store),
            ("V_STORE", v_store),
            ("NEXT_KV_LOAD", self.tile_load("j0 + BK", 4, true)),
            ("V_LOAD", self.v_loads("j0", "k_rows", 3)),
            ("NEXT_K_LOAD", self.tile_load("j0 + BK", 4, false)),
            ("SCORES", self.scores()),
            ("SOFTMAX", self.softmax()),
            ("PV", self.pv()),
            ("ROW_SUMS", self.row_sums()),
            ("STORE", self.store()),
        ];
        slots.extend(self.q_load_slots());
        slots
    }

    /// Words read per storage element, as the counter adds them.
    fn words_per_load(&self) -> String {
        match self.storage {
            Storage::F32 => "LANES".into(),
            Storage::F16 => format!("{}u", self.reg_words),
        }
    }

    /// f16 storage of scalar elements: each storage element holds two tile elements.
    fn pairs(&self) -> bool {
        self.storage == Storage::F16 && self.lanes == 1
    }

    /// The bindings of Q, K and V (and, for f16, their element type and unpacking).
    fn input_decl(&self) -> String {
        let mut e = Emitter::new(0);
        let elem = match self.storage {
            Storage::F32 => "T",
            Storage::F16 => "S",
        };
        if self.storage == Storage::F16 {
            let packed = if self.lanes == 4 { "vec2<u32>" } else { "u32" };
            let halves = 2 * self.reg_words;
            e.line(
                "// Q, K and V are f16 in storage, two to a u32 word (the lower half first, rows \
                 padded to",
            );
            e.line(format!(
                "// whole words): S holds {halves} of them, EWS and EVWS are the row widths of Q/K \
                 and V in S."
            ));
            e.line(format!("alias S = {packed};"));
            e.line(format!("const EWS: u32 = {}u;", self.sew));
            e.line(format!("const EVWS: u32 = {}u;", self.sevw));
            if self.lanes == 4 {
                e.block("fn unpack_t(w: S) -> T", |e| {
                    e.line("return T(unpack2x16float(w.x), unpack2x16float(w.y));");
                });
            }
        }
        for (b, name) in [(1, "q"), (2, "k"), (3, "v")] {
            e.line(format!(
                "@group(0) @binding({b}) var<storage, read> {name}: array<{elem}>;"
            ));
        }
        e.finish()
    }

    /// The slots of the template's loop that scales the query tile by scale * log2(e) into
    /// workgroup memory: an element's zero (past Q's last row), its read, and its store.
    fn q_load_slots(&self) -> [(&'static str, String); 3] {
        let (zero, read) = match self.storage {
            Storage::F32 => ("T()", "q[q_base + idx]"),
            Storage::F16 if self.pairs() => ("vec2<f32>()", "unpack2x16float(q[q_base + idx])"),
            Storage::F16 => ("T()", "unpack_t(q[q_base + idx])"),
        };
        let store = if self.pairs() {
            fill_fragment(Q_PAIR_STORE, &[]).trim_end().to_string()
        } else {
            let w = self.ew_name;
            let mut e = Emitter::new(2);
            e.line(format!("q_tile[(idx / {w}) * QS + idx % {w}] = x;"));
            e.finish()
        };
        [
            ("Q_ZERO", zero.to_string()),
            ("Q_READ", read.to_string()),
            ("Q_STORE", store),
        ]
    }

    /// Query row of register row `a`.
    fn row(&self, a: usize) -> String {
        format!("(tq + {}u)", a * self.t.tq)
    }

    /// Running max, sum and output accumulators of each of the thread's rows.
    fn output_registers(&self) -> String {
        let mut e = Emitter::new(1);
        for a in 0..self.rq {
            e.line(format!("var m_{a} = NEG;"));
            e.line(format!("var l_{a} = 0.0;"));
            for u in 0..self.cv {
                e.line(format!("var o_{a}_{u} = T();"));
            }
        }
        e.finish()
    }

    fn prefetch_registers(&self) -> String {
        let mut e = Emitter::new(1);
        let r = self.reg;
        for u in 0..self.nk {
            e.line(format!("var kx_{u} = {r}();"));
        }
        for u in 0..self.nv {
            e.line(format!("var vx_{u} = {r}();"));
        }
        e.finish()
    }

    /// V rows `rows` of the tile at key `j0` into the vx registers, `depth` levels deep.
    fn v_loads(&self, j0: &str, rows: &str, depth: usize) -> String {
        let mut e = Emitter::new(depth);
        self.emit_v_loads(&mut e, j0, rows);
        e.finish()
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
        let unpack = |x: String| match self.storage {
            Storage::F32 => x,
            Storage::F16 => format!("unpack_t({x})"),
        };
        let mut k = Emitter::new(2);
        for u in 0..self.nk {
            let o = self.wg * u;
            k.block(format!("if (lid + {o}u < BK * {w})"), |e| {
                e.line(format!("let idx = lid + {o}u;"));
                if self.pairs() {
                    let at = "(idx / EWS) * KS + c";
                    e.code(&pair_store(0, &format!("kx_{u}"), at, "EWS", "E"));
                } else {
                    let x = unpack(format!("kx_{u}"));
                    e.line(format!("kv_tile[(idx / {w}) * KS + idx % {w}] = {x};"));
                }
            });
        }
        let mut v = Emitter::new(3);
        for u in 0..self.nv {
            let o = self.wg * u;
            v.block(format!("if (lid + {o}u < BK * {vw})"), |e| {
                if self.pairs() {
                    e.line(format!("let idx = lid + {o}u;"));
                    let at = "vbase + (idx / EVWS) * EVW + c";
                    e.code(&pair_store(1, &format!("vx_{u}"), at, "EVWS", "EV"));
                } else {
                    let x = unpack(format!("vx_{u}"));
                    e.line(format!("kv_tile[vbase + lid + {o}u] = {x};"));
                }
            });
        }
        (k.finish(), v.finish())
    }

    /// Scores stay in registers, masked entries at NEG; each thread posts its partial row maxima.
    fn scores(&self) -> String {
        let (t, rq, rk) = (self.t, self.rq, self.rk);
        let mut e = Emitter::new(2);
        for a in 0..rq {
            for b in 0..rk {
                e.line(format!("var s_{a}_{b} = 0.0;"));
            }
        }
        e.code(&constant_loop(2, "e", ("EW", self.ew), &self.score_step()));
        for a in 0..rq {
            let i = self.row(a);
            for b in 0..rk {
                let jb = b * t.tk;
                e.line(format!(
                    "s_{a}_{b} = select(NEG, s_{a}_{b}, tk + {jb}u < k_rows && (params.causal == 0u || \
                     params.kv_offset + j0 + tk + {jb}u <= params.q_offset + q0 + {i}));"
                ));
            }
            let mx = (1..rk).fold(format!("s_{a}_0"), |acc, b| {
                format!("max({acc}, s_{a}_{b})")
            });
            e.line(format!("part[{i} * TK + tk] = {mx};"));
        }
        e.finish()
    }

    /// One element e of the score products: the thread's Q and K elements, their multiply-adds.
    fn score_step(&self) -> String {
        let (_, comps) = wgsl_element(self.lanes);
        let mut e = Emitter::new(3);
        for a in 0..self.rq {
            e.line(format!("let q_{a} = q_tile[{} * QS + e];", self.row(a)));
        }
        for b in 0..self.rk {
            let jb = b * self.t.tk;
            e.line(format!("let k_{b} = kv_tile[(tk + {jb}u) * KS + e];"));
        }
        for c in comps {
            for a in 0..self.rq {
                for b in 0..self.rk {
                    e.line(format!("s_{a}_{b} = fma(q_{a}{c}, k_{b}{c}, s_{a}_{b});"));
                }
            }
        }
        e.finish()
    }

    /// Online softmax on the thread's own scores (shaders/exact_softmax_row.wgsl per row): the
    /// row maximum from the posted partials, the rescale of its accumulators, P for the P V
    /// product.
    fn softmax(&self) -> String {
        let (t, rk) = (self.t, self.rk);
        let mut softmax = String::new();
        for a in 0..self.rq {
            let r = self.row(a);
            let mut probs = Emitter::new(3);
            for b in 0..rk {
                let jb = b * t.tk;
                let target = if t.p_lanes() == 4 {
                    format!("p_tile[{r} * PS + (tk + {jb}u) / 4u][(tk + {jb}u) % 4u]")
                } else {
                    format!("p_tile[{r} * PS + tk + {jb}u]")
                };
                probs.line(format!(
                    "let p_{b} = select(0.0, exp2(s_{a}_{b} - mx), s_{a}_{b} > NEG);"
                ));
                probs.line(format!("{target} = p_{b};"));
            }
            let sum = (0..rk)
                .map(|b| format!("p_{b}"))
                .collect::<Vec<_>>()
                .join(" + ");
            let mut rescale = Emitter::new(3);
            for u in 0..self.cv {
                rescale.line(format!("o_{a}_{u} *= alpha;"));
            }
            let slots = [
                ("A", a.to_string()),
                ("ROW", r),
                ("PROBS", probs.finish()),
                ("SUM", sum),
                ("RESCALE", rescale.finish()),
            ];
            softmax.push_str(&fill_fragment(SOFTMAX_ROW, &slots));
        }
        softmax.trim_end().to_string()
    }

    /// The P V product. Element columns of a thread: tk + u * TK (consecutive threads read
    /// consecutive elements). With a vec4 P tile, one load brings the probabilities of four keys.
    fn pv(&self) -> String {
        let t = self.t;
        let (_, p_comps) = wgsl_element(t.p_lanes());
        let p_step = p_comps.len();
        let mut e = Emitter::new(3);
        for a in 0..self.rq {
            e.line(format!("let p_{a} = p_tile[{} * PS + jp];", self.row(a)));
        }
        for (l, pc) in p_comps.iter().enumerate() {
            for u in 0..self.cv {
                let cu = u * t.tk;
                e.line(format!(
                    "let v_{l}_{u} = kv_tile[vbase + ({p_step}u * jp + {l}u) * EVW + tk + {cu}u];"
                ));
            }
            for a in 0..self.rq {
                for u in 0..self.cv {
                    e.line(format!(
                        "o_{a}_{u} = fma(T(p_{a}{pc}), v_{l}_{u}, o_{a}_{u});"
                    ));
                }
            }
        }
        let pv_steps = format!("BK / {p_step}u");
        constant_loop(2, "jp", (&pv_steps, t.bk / p_step), &e.finish())
    }

    /// Each thread's partial sums of its rows, for the row sums after the barrier.
    fn row_sums(&self) -> String {
        let mut e = Emitter::new(1);
        for a in 0..self.rq {
            e.line(format!("part[{} * TK + tk] = l_{a};", self.row(a)));
        }
        e.finish()
    }

    /// Per row (shaders/exact_store_row.wgsl): its sum from the TK partial sums (posted before
    /// the template's barrier), the normalised output row and, for split keys, its statistics.
    fn store(&self) -> String {
        let t = self.t;
        let (_, comps) = wgsl_element(self.lanes);
        let mut store = String::new();
        for a in 0..self.rq {
            let mut columns = Emitter::new(2);
            for u in 0..self.cv {
                let cu = u * t.tk;
                columns.block(format!("if (i < q_rows && tk + {cu}u < EVW)"), |e| {
                    for (l, c) in comps.iter().enumerate() {
                        e.line(format!(
                            "o[(head * params.l + q0 + i) * EV + LANES * (tk + {cu}u) + {l}u] = \
                             select(0.0, o_{a}_{u}{c} / li, li > 0.0);"
                        ));
                    }
                    e.line("words_written += LANES;");
                });
            }
            let slots = [
                ("ROW", self.row(a)),
                ("COLUMNS", columns.finish()),
                ("A", a.to_string()),
            ];
            store.push_str(&fill_fragment(STORE_ROW, &slots));
        }
        store.trim_end().to_string()
    }
}

/// The f16 pair store of prefetch register `reg` (shaders/exact_pair_store.wgsl), `deeper` levels
/// below the K store's depth.
fn pair_store(deeper: usize, reg: &str, at: &str, col: &str, width: &str) -> String {
    let slots = [
        ("REG", reg.to_string()),
        ("COL", col.to_string()),
        ("AT", at.to_string()),
        ("WIDTH", width.to_string()),
    ];
    indent(deeper, &fill_fragment(PAIR_STORE, &slots))
}
