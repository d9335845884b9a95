//! The tuning cache on disk: one file per kind and adapter key, one line per class.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::rates::Rates;

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
