//! Host work over large slices split into contiguous chunks, one scoped thread each: the
//! conversions, checks and copies every call makes on inputs of up to gigabytes.

/// Elements from which a pass over a slice is split over threads (below, a thread costs more
/// than it saves).
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 20;

/// Threads for `amount` units of host work that pays off from `threshold` units on: 1 below it,
/// else one per core, at most 8.
pub(crate) fn threads_for(amount: usize, threshold: usize) -> usize {
    if amount < threshold {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `f` over chunks of `x` (whole multiples of `unit` elements, one per thread from
/// [`PARALLEL_ELEMENTS`] elements on, else `x` whole), in order; `None` where a thread
/// panicked, for the caller to read as its own "unknown".
pub(crate) fn map_chunks<T: Sync, R: Send>(
    x: &[T],
    unit: usize,
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<Option<R>> {
    let threads = threads_for(x.len(), PARALLEL_ELEMENTS);
    if threads == 1 {
        return vec![Some(f(x))];
    }
    let unit = unit.max(1);
    let per = (x.len() / unit).div_ceil(threads) * unit;
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = x.chunks(per).map(|c| s.spawn(move || f(c))).collect();
        hs.into_iter().map(|h| h.join().ok()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_slice_in_order_on_whole_units() {
        let x: Vec<u32> = (0..(3 * PARALLEL_ELEMENTS as u32 + 7)).collect();
        let parts = map_chunks(&x, 7, |c| (c.len(), c[0], *c.last().unwrap()));
        let parts: Vec<_> = parts.into_iter().map(Option::unwrap).collect();
        assert_eq!(parts.iter().map(|p| p.0).sum::<usize>(), x.len());
        for w in parts.windows(2) {
            assert_eq!(w[0].2 + 1, w[1].1);
        }
        for p in &parts[..parts.len() - 1] {
            assert_eq!(p.0 % 7, 0);
        }
        assert_eq!(map_chunks(&x[..10], 1, <[u32]>::len), vec![Some(10)]);
    }
}
