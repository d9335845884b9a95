//! The tuning cache on disk: one file per kind of record and adapter (name, driver, backend), one
//! line per entry: `<class>\t<fingerprint>\t<values>`, the last entry of a class winning. The
//! fingerprint is that of the WGSL of the class's kernels ([`crate::wgsl::fingerprint`]): an entry
//! whose kernels changed is stale. Stale and unreadable entries (and files that are not text) are
//! ignored, with one warning per file and process; a cache that cannot be written costs only a
//! re-measurement.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Cache files as read or written by this process: `auto` and the tuned tiles consult them on
/// every call, and the disk is read once per file.
static FILES: Mutex<Option<HashMap<PathBuf, Option<String>>>> = Mutex::new(None);

/// Files this process has warned about.
static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

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

/// One cache file.
pub(crate) struct CacheFile {
    path: Option<PathBuf>,
}

impl CacheFile {
    /// The file of records `kind` for `adapter_key` in `dir` (none without a directory).
    pub(crate) fn new(dir: Option<&Path>, kind: &str, adapter_key: &str) -> Self {
        let name: String = adapter_key
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        CacheFile {
            path: dir.map(|d| d.join(format!("{kind}-{name}.txt"))),
        }
    }

    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The values of the last current entry of `class` that `parse` accepts. Entries of the class
    /// with another fingerprint, lines that are not entries, and values `parse` refuses are
    /// skipped, with one warning.
    pub(crate) fn load<T>(
        &self,
        class: &str,
        fingerprint: u64,
        parse: impl Fn(&[&str]) -> Option<T>,
    ) -> Option<T> {
        let path = self.path.as_ref()?;
        let Some(text) = read_cache(path) else {
            if path.exists() {
                self.warn_once("contents that are not text (a damaged file)");
            }
            return None;
        };
        let fp = format!("{fingerprint:016x}");
        let mut skipped = 0usize;
        let mut found = None;
        for line in text.lines().rev() {
            let fields: Vec<&str> = line.split('\t').collect();
            let [c, f, values] = fields[..] else {
                skipped += 1;
                continue;
            };
            if c != class {
                continue;
            }
            let values: Vec<&str> = values.split_whitespace().collect();
            match parse(&values) {
                Some(v) if f == fp => {
                    found = Some(v);
                    break;
                }
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            self.warn_once(&format!(
                "{skipped} stale or unreadable entries (kernels changed, or a damaged file)"
            ));
        }
        found
    }

    /// Appends an entry of `class`.
    pub(crate) fn store(&self, class: &str, fingerprint: u64, values: &[String]) {
        if let Some(path) = &self.path {
            let mut text = read_cache(path).unwrap_or_default();
            text.push_str(&format!(
                "{class}\t{fingerprint:016x}\t{}\n",
                values.join(" ")
            ));
            write_cache(path.clone(), text);
        }
    }

    /// Says once per process and file that some of its entries are ignored; true where it said
    /// so now.
    pub(crate) fn warn_once(&self, what: &str) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        let first = warned.get_or_insert_with(HashSet::new).insert(path.clone());
        if first {
            eprintln!(
                "approx_attn: the tuning cache {} has {what}; they are ignored and measured again \
                 where needed",
                path.display()
            );
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usizes(v: &[&str]) -> Option<Vec<usize>> {
        v.iter().map(|t| t.parse().ok()).collect()
    }

    #[test]
    fn entries_round_trip_by_class_and_fingerprint() {
        let dir = std::env::temp_dir().join(format!("aa-cache-{}", std::process::id()));
        let rates = CacheFile::new(Some(&dir), "rates", "Test GPU (1)");
        let f = |v: &[f64]| v.iter().map(f64::to_string).collect::<Vec<_>>();
        let pair = |v: &[&str]| -> Option<(f64, f64)> {
            match v {
                [a, b] => Some((a.parse().ok()?, b.parse().ok()?)),
                _ => None,
            }
        };
        rates.store("64 64 2", 7, &f(&[1.5e9, 2.5e9]));
        rates.store("64 64 2 trusted", 7, &f(&[3.5e9, 2.5e9]));
        assert_eq!(rates.load("64 64 2", 7, pair), Some((1.5e9, 2.5e9)));
        assert_eq!(rates.load("64 64 2 trusted", 7, pair), Some((3.5e9, 2.5e9)));
        assert_eq!(rates.load("64 64 3", 7, pair), None);
        assert_eq!(rates.load("128 128 2", 7, pair), None);
        // Another fingerprint: the kernels changed, the entry is stale.
        assert_eq!(rates.load("64 64 2", 8, pair), None);

        let tiles = CacheFile::new(Some(&dir), "tiles", "Test GPU (1)");
        tiles.store("64 64 0", 1, &["64 32 8 8".into()]);
        tiles.store("64 64 0", 1, &["32 32 16 8".into()]);
        assert_eq!(tiles.load("64 64 0", 1, usizes), Some(vec![32, 32, 16, 8]));
        assert_eq!(tiles.load("64 64 1", 1, usizes), None);
        // A trusted-mode class (`Tuner::tuned` suffixes it) and the plain one never mix.
        tiles.store("64 64 0 trusted", 1, &["16 16 4 4".into()]);
        assert_eq!(tiles.load("64 64 0", 1, usizes), Some(vec![32, 32, 16, 8]));
        assert_eq!(
            tiles.load("64 64 0 trusted", 1, usizes),
            Some(vec![16, 16, 4, 4])
        );
        // Damaged lines and values are skipped, older good entries still count.
        let path = tiles.path().unwrap().to_path_buf();
        let mut text = read_cache(&path).unwrap();
        text.push_str("garbage without fields\n64 64 0\t0000000000000001\t32 x 16 8\n");
        write_cache(path, text);
        assert_eq!(tiles.load("64 64 0", 1, usizes), Some(vec![32, 32, 16, 8]));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn corrupt_files_are_ignored_with_one_warning_and_drivers_keep_apart() {
        let dir = std::env::temp_dir().join(format!("aa-cache-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The adapter key names the file: another driver of the same adapter never reads it.
        let old = CacheFile::new(Some(&dir), "tiles", "Test GPU 1.0 Vulkan");
        let new = CacheFile::new(Some(&dir), "tiles", "Test GPU 1.1 Vulkan");
        assert_ne!(old.path(), new.path());
        // Bytes that are not text, and text that is not entries: nothing loads, nothing fails.
        std::fs::write(old.path().unwrap(), [0xff, 0xfe, 0x00, b'\t', 0x80]).unwrap();
        assert_eq!(old.load("64 64 0", 1, usizes), None);
        assert!(!old.warn_once("anything"));
        std::fs::write(
            new.path().unwrap(),
            "64 64 0\t0000000000000001\t-3 x\n\0\0\n",
        )
        .unwrap();
        assert_eq!(new.load("64 64 0", 1, usizes), None);
        // The damaged file warned when it was read; a second reason is not said again.
        assert!(!new.warn_once("anything"));
        // A file whose only entry is stale warns once, however often it is read.
        let stale = CacheFile::new(Some(&dir), "rates", "Test GPU 1.0 Vulkan");
        std::fs::write(stale.path().unwrap(), "64 64 2\t0000000000000007\t1 2\n").unwrap();
        assert_eq!(stale.load("64 64 2", 8, usizes), None);
        assert_eq!(stale.load("64 64 2", 8, usizes), None);
        assert!(!stale.warn_once("anything"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
