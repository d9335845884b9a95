//! The monomial features of a degree-g polynomial kernel: their count, the table of index tuples,
//! the query weights for any coefficients, and the packed index words the kernels read.

use super::fit::{trim, Poly};

/// Largest feature table [`feature_table`] builds: `r` (features) ...
pub const MAX_FEATURES: u64 = 50_000_000;

/// ... and `r * g` (entries of `indices`).
pub const MAX_INDEX_ENTRIES: u64 = 8 * MAX_FEATURES;

/// Number of monomials of degree <= g in e variables: C(e+g, g), saturating at `u64::MAX`.
pub fn num_features(e: usize, g: usize) -> u64 {
    let k = e.min(g) as u128;
    let n = e as u128 + g as u128;
    let mut c: u128 = 1;
    for i in 1..=k {
        // c = C(n-k+i, i) after this step: exact, and increasing in i.
        match c.checked_mul(n - k + i) {
            Some(v) => c = v / i,
            None => return u64::MAX,
        }
        if c > u64::MAX as u128 {
            return u64::MAX;
        }
    }
    c as u64
}

/// Feature table for the asymmetric map (see docs/io-model.md): for each monomial alpha of degree <= g in e
/// variables, in graded order (degree 0 first, then degree 1 with index 0..e-1, then degree 2 as
/// sorted index tuples (i<=j) in lexicographic order, etc.):
///   indices: g entries per feature, the sorted variable indices of the monomial padded with the
///            sentinel value `e` (meaning "the constant 1"), so that `feature(x) = prod_t xext[indices[t]]`
///            where xext = [x_0..x_{e-1}, 1];  total length r*g  (for g == 0: empty, r = 1)
///   degree:  |alpha| per feature
///   multinomial: (|alpha| choose alpha) per feature, as f64 (e.g. x_i*x_j with i<j -> 2, x_i^2 -> 1)
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureTable {
    pub e: usize,
    pub g: usize,
    pub r: usize,
    pub indices: Vec<u32>,
    pub degree: Vec<u32>,
    pub multinomial: Vec<f64>,
}

/// [`try_feature_table`], panicking on its error (tables with more than [`MAX_FEATURES`]
/// features or [`MAX_INDEX_ENTRIES`] index entries).
pub fn feature_table(e: usize, g: usize) -> FeatureTable {
    try_feature_table(e, g).unwrap_or_else(|msg| panic!("{msg}"))
}

/// Build the [`FeatureTable`] for `e` variables and degree `g`. Refuses (before allocating) when
/// `r = C(e+g, g) > MAX_FEATURES` (50,000,000), `r * g > MAX_INDEX_ENTRIES`, or `e >= u32::MAX`.
pub fn try_feature_table(e: usize, g: usize) -> Result<FeatureTable, String> {
    let r = num_features(e, g);
    if r > MAX_FEATURES {
        return Err(format!(
            "feature table for e={e}, g={g} would have {r} features, more than {MAX_FEATURES}"
        ));
    }
    if r.saturating_mul(g as u64) > MAX_INDEX_ENTRIES {
        return Err(format!(
            "feature table for e={e}, g={g} would have {r}*{g} index entries, more than {MAX_INDEX_ENTRIES}"
        ));
    }
    let sentinel = u32::try_from(e)
        .ok()
        .filter(|&s| s < u32::MAX)
        .ok_or_else(|| format!("feature table: e={e} does not fit the u32 indices"))?;
    let r = r as usize;
    let mut t = FeatureTable {
        e,
        g,
        r,
        indices: Vec::with_capacity(r * g),
        degree: Vec::with_capacity(r),
        multinomial: Vec::with_capacity(r),
    };
    for k in 0..=g {
        if k > 0 && e == 0 {
            break;
        }
        // Odometer over non-decreasing k-tuples: lexicographic order.
        let mut tuple = vec![0u32; k];
        loop {
            t.indices.extend_from_slice(&tuple);
            t.indices.extend(std::iter::repeat_n(sentinel, g - k));
            t.degree.push(k as u32);
            t.multinomial.push(multinomial(&tuple));
            match tuple.iter().rposition(|&v| v + 1 < sentinel) {
                Some(p) => {
                    let v = tuple[p] + 1;
                    tuple[p..].fill(v);
                }
                None => break,
            }
        }
    }
    debug_assert_eq!(t.degree.len(), r);
    Ok(t)
}

/// Number of monomials of degree exactly m in e variables: C(e+m-1, m).
pub fn num_features_of_degree(e: usize, m: usize) -> u64 {
    if m == 0 {
        1
    } else {
        num_features(e, m).saturating_sub(num_features(e, m - 1))
    }
}

/// The features of a kernel whose coefficients vanish outside `support` (degrees 0..=g): the
/// [`try_feature_table`] rows of those degrees only, in the same order. x^2 alone needs
/// C(e+1, 2) features, not C(e+2, 2).
pub fn try_feature_table_for(
    e: usize,
    g: usize,
    support: impl Fn(usize) -> bool,
) -> Result<FeatureTable, String> {
    let mut t = try_feature_table(e, g)?;
    let keep: Vec<bool> = t.degree.iter().map(|&m| support(m as usize)).collect();
    let mut indices = Vec::with_capacity(t.indices.len());
    for (f, &k) in keep.iter().enumerate() {
        if k {
            indices.extend_from_slice(&t.indices[f * g..(f + 1) * g]);
        }
    }
    let mut it = keep.iter();
    t.degree.retain(|_| *it.next().unwrap_or(&false));
    let mut it = keep.iter();
    t.multinomial.retain(|_| *it.next().unwrap_or(&false));
    t.indices = indices;
    t.r = t.degree.len();
    Ok(t)
}

/// `|a|! / prod_i a_i!` for the monomial given as a sorted index tuple.
fn multinomial(tuple: &[u32]) -> f64 {
    // Product of binomials C(S_j, c_j), built one factor at a time so every step stays integral.
    let (mut m, mut cum, mut run) = (1.0f64, 0.0f64, 0.0f64);
    for (i, &v) in tuple.iter().enumerate() {
        run = if i > 0 && tuple[i - 1] == v {
            run + 1.0
        } else {
            1.0
        };
        cum += 1.0;
        m = m * cum / run;
    }
    m
}

/// Per-feature query weights w_alpha = coeffs[|alpha|] * scale^{|alpha|} * multinomial_alpha, so that
/// sum_alpha w_alpha * q^alpha * k^alpha == P(scale * q.k)   (the asymmetric map: phi_q = w*q^alpha, phi_k = k^alpha).
///
/// Panics if `poly` has a non-zero coefficient above `table.g` (the table cannot represent it).
pub fn query_weights(table: &FeatureTable, poly: &Poly, scale: f64) -> Vec<f64> {
    let deg = trim(&poly.coeffs).len().saturating_sub(1);
    assert!(
        deg <= table.g,
        "query_weights: polynomial degree {deg} exceeds the feature table degree {}",
        table.g
    );
    table
        .degree
        .iter()
        .zip(&table.multinomial)
        .map(|(&k, &m)| {
            let c = poly.coeffs.get(k as usize).copied().unwrap_or(0.0);
            c * scale.powi(k as i32) * m
        })
        .collect()
}

/// Indices of one feature packed 3 to a word (10 bits each; E <= 1023 with the sentinel E = "1").
pub fn index_words(g: usize) -> usize {
    g.div_ceil(3).max(1)
}

/// Packs a feature table's indices three to a u32 (10 bits each), `index_words(g)` words per row.
pub fn pack_indices(table: &FeatureTable) -> Vec<u32> {
    let iw = index_words(table.g);
    let mut out = vec![0u32; table.r * iw];
    for f in 0..table.r {
        for t in 0..table.g {
            out[f * iw + t / 3] |= table.indices[f * table.g + t] << (10 * (t % 3));
        }
    }
    out
}
