//! Predicted cost of each method, for `method="auto"`: FLOP counts from the plans, divided by
//! per-adapter throughputs measured once by a calibration run and cached on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::plan::{PolyPlan, Problem};

/// Query-key pairs the exact kernel evaluates (the causal mask hides j > i).
pub fn visible_pairs(p: &Problem) -> f64 {
    let (l, s) = (p.l as f64, p.s as f64);
    if !p.causal {
        return l * s;
    }
    // sum_{i<L} min(i+1, S)
    let full = l.min(s);
    full * (full + 1.0) / 2.0 + (l - full).max(0.0) * s
}

/// Floating-point operations of exact attention (two products of E and Ev per pair).
pub fn exact_flops(p: &Problem) -> f64 {
    p.query_heads() as f64 * visible_pairs(p) * 2.0 * (p.e + p.ev) as f64
}

/// Floating-point operations of the polynomial method: pre-pass, features (g multiplies per
/// feature per row), the two products with S' and the reduction of the key splits.
pub fn poly_flops(p: &Problem, plan: &PolyPlan) -> f64 {
    let (r, g, ev1) = (plan.r as f64, plan.degree as f64, (p.ev + 1) as f64);
    let heads = p.query_heads() as f64;
    let units = p.units as f64;
    let (l, s) = (p.l as f64, p.s as f64);
    let prepass = 2.0 * (heads * l * p.e as f64 + units * s * (2 * p.e + p.ev) as f64);
    let pass1 = units * s * r * (g + 2.0 * ev1);
    let reduce = units * plan.splits as f64 * r * ev1;
    let pass2 = heads * l * r * (g + 2.0 * ev1);
    prepass + pass1 + reduce + pass2
}

/// Effective throughputs (FLOP/s) of the two kernel families on one adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub exact_flops_per_s: f64,
    pub poly_flops_per_s: f64,
}

pub(crate) fn cache_path(kind: &str, adapter_key: &str) -> Option<PathBuf> {
    let base = std::env::var_os("APPROX_ATTN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("approx_attn"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/approx_attn"))
        })?;
    let name: String = adapter_key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Some(base.join(format!("{kind}-{name}.txt")))
}

/// Cache files as read or written by this process: `auto` and the tuned tiles consult them on
/// every call, and the disk is read once per file.
static FILES: Mutex<Option<HashMap<PathBuf, Option<String>>>> = Mutex::new(None);

fn read_cache(path: &Path) -> Option<String> {
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    files
        .get_or_insert_with(HashMap::new)
        .entry(path.to_path_buf())
        .or_insert_with(|| std::fs::read_to_string(path).ok())
        .clone()
}

fn write_cache(path: PathBuf, text: String) {
    // A cache miss only costs a re-measurement, so write failures are ignored.
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(&path, &text);
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    files
        .get_or_insert_with(HashMap::new)
        .insert(path, Some(text));
}

/// The rates of `class` (a line "<class> <exact> <poly>" of the rates file; the last one wins).
pub fn load_rates(adapter_key: &str, class: &str) -> Option<Rates> {
    let text = read_cache(&cache_path("rates", adapter_key)?)?;
    text.lines().rev().find_map(|line| {
        let rest = line.strip_prefix(class)?.strip_prefix(' ')?;
        let mut it = rest.split_whitespace().map(|t| t.parse::<f64>());
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(a)), Some(Ok(b)), None) if a > 0.0 && b > 0.0 => Some(Rates {
                exact_flops_per_s: a,
                poly_flops_per_s: b,
            }),
            _ => None,
        }
    })
}

pub fn store_rates(adapter_key: &str, class: &str, rates: &Rates) {
    if let Some(path) = cache_path("rates", adapter_key) {
        let mut text = read_cache(&path).unwrap_or_default();
        text.push_str(&format!(
            "{class} {} {}\n",
            rates.exact_flops_per_s, rates.poly_flops_per_s
        ));
        write_cache(path, text);
    }
}

/// Tuned numbers for a shape class (a line "<class> <n1> <n2> ..." of a cache file).
pub fn load_tuned(kind: &str, adapter_key: &str, class: &str) -> Option<Vec<usize>> {
    let text = read_cache(&cache_path(kind, adapter_key)?)?;
    text.lines().rev().find_map(|line| {
        let rest = line.strip_prefix(class)?.strip_prefix(' ')?;
        rest.split_whitespace().map(|t| t.parse().ok()).collect()
    })
}

pub fn store_tuned(kind: &str, adapter_key: &str, class: &str, values: &[usize]) {
    if let Some(path) = cache_path(kind, adapter_key) {
        let line: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut text = read_cache(&path).unwrap_or_default();
        text.push_str(&format!("{class} {}\n", line.join(" ")));
        write_cache(path, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_pairs() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 4,
            s: 3,
            e: 1,
            ev: 1,
            causal: true,
            scale: 1.0,
        };
        // rows see 1, 2, 3, 3 keys
        assert_eq!(visible_pairs(&p), 9.0);
        assert_eq!(visible_pairs(&Problem { causal: false, ..p }), 12.0);
        assert_eq!(exact_flops(&p), 9.0 * 4.0);
    }

    #[test]
    fn rates_round_trip() {
        let dir = std::env::temp_dir().join(format!("aa-rates-{}", std::process::id()));
        std::env::set_var("APPROX_ATTN_CACHE_DIR", &dir);
        let r = Rates {
            exact_flops_per_s: 1.5e9,
            poly_flops_per_s: 2.5e9,
        };
        store_rates("Test GPU (1)", "64 64 2", &r);
        let trusted = Rates {
            exact_flops_per_s: 3.5e9,
            ..r
        };
        store_rates("Test GPU (1)", "64 64 2 trusted", &trusted);
        assert_eq!(load_rates("Test GPU (1)", "64 64 2"), Some(r));
        assert_eq!(load_rates("Test GPU (1)", "64 64 2 trusted"), Some(trusted));
        assert_eq!(load_rates("Test GPU (1)", "64 64 3"), None);
        assert_eq!(load_rates("Test GPU (1)", "128 128 2"), None);
        store_tuned("tiles", "Test GPU (1)", "64 64 0", &[64, 32, 8, 8]);
        store_tuned("tiles", "Test GPU (1)", "64 64 0", &[32, 32, 16, 8]);
        assert_eq!(
            load_tuned("tiles", "Test GPU (1)", "64 64 0"),
            Some(vec![32, 32, 16, 8])
        );
        assert_eq!(load_tuned("tiles", "Test GPU (1)", "64 64 1"), None);
        // A trusted-mode class (`tuned_values` suffixes it) and the plain one never mix.
        store_tuned("tiles", "Test GPU (1)", "64 64 0 trusted", &[16, 16, 4, 4]);
        assert_eq!(
            load_tuned("tiles", "Test GPU (1)", "64 64 0"),
            Some(vec![32, 32, 16, 8])
        );
        assert_eq!(
            load_tuned("tiles", "Test GPU (1)", "64 64 0 trusted"),
            Some(vec![16, 16, 4, 4])
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
