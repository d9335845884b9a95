//! WGSL generation helpers shared by every kernel: template filling, unrolled loops, tile elements,
//! the I/O counter slots, and the fingerprint of the kernels (the tuning cache key).

/// FNV-1a hash (64 bits, stable across platforms and Rust versions) of generated WGSL sources: the
/// key under which tuned tiles and rates are cached, so that a change of the kernels a class runs
/// re-measures it while host-only changes keep the measurements.
pub fn fingerprint(sources: &[String]) -> u64 {
    sources
        .iter()
        .flat_map(|s| s.bytes().chain([0u8]))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// Replaces every `{{NAME}}` slot of a WGSL template. Every slot of the template must be given a
/// value and every value must fill a slot: a mismatch is a bug of the generator, so it panics in
/// release builds too (the golden test generates every kernel over a grid).
pub(crate) fn fill_template(template: &str, slots: &[(&str, String)]) -> String {
    let mut s = template.to_string();
    for (name, value) in slots {
        let slot = format!("{{{{{name}}}}}");
        assert!(
            s.contains(&slot),
            "the template has no slot {slot} (or it is given twice)"
        );
        s = s.replace(&slot, value);
    }
    if let Some(i) = s.find("{{") {
        let end = s[i..].find("}}").map_or(s.len(), |j| i + j + 2);
        panic!("slot {} of a shader template is not filled", &s[i..end]);
    }
    s
}

/// A fragment template (`shaders/*_store.wgsl`, `shaders/exact_coop_*.wgsl`: a block of a kernel,
/// often repeated once per unrolled register tile, barriers and guards included) filled like
/// [`fill_template`]; its leading `//` lines describe it and are not part of the code.
pub(crate) fn fill_fragment(fragment: &str, slots: &[(&str, String)]) -> String {
    let mut code = fragment;
    while code.starts_with("//") {
        code = code.split_once('\n').map_or("", |(_, rest)| rest);
    }
    fill_template(code, slots)
}

/// `code` with each line `levels` levels (four spaces each) deeper: a fragment written at one
/// depth, used where it sits deeper.
pub(crate) fn indent(levels: usize, code: &str) -> String {
    let pad = "    ".repeat(levels);
    code.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes generated WGSL line by line at a tracked depth (four spaces a level), so that generators
/// do not thread indentation strings by hand.
pub(crate) struct Emitter {
    out: String,
    depth: usize,
}

impl Emitter {
    /// An emitter whose lines start `depth` levels deep.
    pub(crate) fn new(depth: usize) -> Self {
        Emitter {
            out: String::new(),
            depth,
        }
    }

    /// One line at the current depth.
    pub(crate) fn line(&mut self, text: impl AsRef<str>) -> &mut Self {
        for _ in 0..self.depth {
            self.out.push_str("    ");
        }
        self.out.push_str(text.as_ref());
        self.out.push('\n');
        self
    }

    /// `head {`, the lines of `body` one level deeper, and `}`.
    pub(crate) fn block(
        &mut self,
        head: impl AsRef<str>,
        body: impl FnOnce(&mut Self),
    ) -> &mut Self {
        self.line(format!("{} {{", head.as_ref()));
        self.depth += 1;
        body(self);
        self.depth -= 1;
        self.line("}")
    }

    /// `{`, the lines of `body` one level deeper, and `}`.
    pub(crate) fn scope(&mut self, body: impl FnOnce(&mut Self)) -> &mut Self {
        self.line("{");
        self.depth += 1;
        body(self);
        self.depth -= 1;
        self.line("}")
    }

    /// The lines of a fragment written at depth 0, at the current depth (empty lines stay
    /// empty).
    pub(crate) fn lines(&mut self, text: &str) -> &mut Self {
        for l in text.lines() {
            if l.is_empty() {
                self.out.push('\n');
            } else {
                self.line(l);
            }
        }
        self
    }

    /// Code generated elsewhere at this depth (its lines indented already), as one more line.
    pub(crate) fn code(&mut self, text: &str) -> &mut Self {
        self.out.push_str(text);
        self.out.push('\n');
        self
    }

    /// The lines written, without the last newline.
    pub(crate) fn finish(mut self) -> String {
        if self.out.ends_with('\n') {
            self.out.pop();
        }
        self.out
    }
}

/// A tile element of `lanes` floats (1 or 4) in WGSL: its type, and the suffixes that pick its
/// floats in order ("" for a scalar).
pub(crate) fn wgsl_element(lanes: usize) -> (&'static str, &'static [&'static str]) {
    if lanes == 4 {
        ("vec4<f32>", &[".x", ".y", ".z", ".w"])
    } else {
        ("f32", &[""])
    }
}

/// The I/O counter's declaration and the per-thread add, or nothing when counting is off.
pub(crate) fn io_counter_slots(count_io: bool, binding: u32) -> [(&'static str, String); 2] {
    if count_io {
        [
            (
                "IO_COUNTER_DECL",
                format!(
                    "@group(0) @binding({binding}) var<storage, read_write> io_words: array<atomic<u32>, 2>;"
                ),
            ),
            (
                "IO_COUNTER_ADD",
                "    atomicAdd(&io_words[0], words_read);\n    atomicAdd(&io_words[1], words_written);"
                    .to_string(),
            ),
        ]
    } else {
        [
            ("IO_COUNTER_DECL", String::new()),
            ("IO_COUNTER_ADD", String::new()),
        ]
    }
}

/// Most steps a loop of constant trip count is written out into (one block per step).
pub(crate) const MAX_UNROLLED_STEPS: usize = 32;

/// A loop over `i` in `0..steps`, `steps` known when the WGSL is generated, `depth` levels deep
/// (`body`: its lines one level deeper): written out step by step with `i` a constant up to
/// [`MAX_UNROLLED_STEPS`], a constant-trip loop beyond. NVIDIA's
/// Vulkan compiler did not unroll such loops itself (H100: poly pass 2 at E = 128 took 49 instead
/// of 66 ms written out).
pub(crate) fn constant_loop(
    depth: usize,
    i: &str,
    (name, steps): (&str, usize),
    body: &str,
) -> String {
    let body = body.trim_end();
    let mut e = Emitter::new(depth);
    if steps <= MAX_UNROLLED_STEPS {
        for k in 0..steps {
            e.scope(|e| {
                e.line(format!("let {i} = {k}u;")).code(body);
            });
        }
    } else {
        e.block(format!("for (var {i} = 0u; {i} < {name}; {i}++)"), |e| {
            e.code(body);
        });
    }
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_slots_are_all_filled_and_all_used() {
        let t = "a {{X}} b {{Y}} {{X}}";
        let filled = fill_template(t, &[("X", "1".into()), ("Y", "2".into())]);
        assert_eq!(filled, "a 1 b 2 1");
        let unfilled = std::panic::catch_unwind(|| fill_template(t, &[("X", "1".into())]));
        assert!(unfilled.is_err());
        let unused = std::panic::catch_unwind(|| {
            fill_template(
                t,
                &[("X", "1".into()), ("Y", "2".into()), ("Z", "3".into())],
            )
        });
        assert!(unused.is_err());
    }

    #[test]
    fn constant_loops_are_written_out_or_loop_at_their_depth() {
        let body = "            x += y[i];\n";
        assert_eq!(
            constant_loop(2, "i", ("N", 2), body),
            "        {\n            let i = 0u;\n            x += y[i];\n        }\n\
             \u{20}       {\n            let i = 1u;\n            x += y[i];\n        }"
        );
        let many = MAX_UNROLLED_STEPS + 1;
        assert_eq!(
            constant_loop(2, "i", ("N", many), body),
            "        for (var i = 0u; i < N; i++) {\n            x += y[i];\n        }"
        );
        assert_eq!(constant_loop(2, "i", ("N", 0), body), "");
    }

    #[test]
    fn fragment_drops_its_description_and_fills_its_slots() {
        let f = "// what it is\n// more\n    x_{{A}} = {{A}}u;\n    // kept\n";
        let filled = fill_fragment(f, &[("A", "3".into())]);
        assert_eq!(filled, "    x_3 = 3u;\n    // kept\n");
        assert_eq!(indent(1, "a;\n\n    b;\n"), "    a;\n\n        b;");
        let mut e = Emitter::new(1);
        e.line("{").lines("a;\n\n    b;\n").line("}");
        assert_eq!(e.finish(), "    {\n    a;\n\n        b;\n    }");
    }
}
