// Fragment of shaders/exact.wgsl (slot Q_STORE), with f16 storage of scalar elements: the two
// halves x of Q's storage element idx into the Q tile, the second only inside the row (at an odd
// width's end it is the pad half).
        let c = 2u * (idx % EWS);
        q_tile[(idx / EWS) * QS + c] = x.x;
        if (c + 1u < E) {
            q_tile[(idx / EWS) * QS + c + 1u] = x.y;
        }
