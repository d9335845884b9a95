//! The polynomial (Alman-Song) method: fit and certify a polynomial for exp, its monomial features,
//! the degree from eps, the GPU pre-pass, plans of the two passes (f32 and tensor cores), their
//! WGSL, the host loop, the words moved and the FLOPs.

pub mod causal;
pub mod causal_coop;
pub mod certificate;
pub mod cost;
pub mod decode;
pub mod features;
pub mod fit;
pub mod io;
pub mod kernel_common;
pub mod kernel_coop;
pub mod kernel_f32;
pub mod plan;
pub mod prepass;
pub mod primitive;
pub mod rounding;
pub mod run;
