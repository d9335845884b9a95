//! FLOPs of the poly method, for `auto`'s prediction.

use super::plan::PolyPlan;
use crate::api::Problem;

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
