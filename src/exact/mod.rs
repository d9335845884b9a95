//! The exact method: FlashAttention-style tiling with an online softmax. Plan (tiles), kernel
//! (WGSL generation), run (host loop), io (words moved) and cost (FLOPs).

pub mod coop;
pub mod cost;
pub mod io;
pub mod kernel;
pub mod plan;
pub mod run;
pub mod storage;
