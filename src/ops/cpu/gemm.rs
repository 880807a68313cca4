//! Strided f32 GEMM over the `gemm` crate, multithreaded with rayon above a size
//! threshold (tiny products are faster on one thread).

/// A read-only matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major `[cols, rows]` matrix.
    pub fn rm_t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: 1, cs: rows }
    }
    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

const PARALLEL_FLOPS: usize = 1 << 18;

/// `c[m, n] (row-major) = beta·c + alpha·a·b`; `beta = 0` ignores what `c` held.
pub fn matmul(c: &mut [f32], a: Mat, b: Mat, alpha: f32, beta: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul inner dimensions");
    assert!(c.len() >= m * n, "matmul output too small");
    assert!(a.data.len() >= a.max_index() && b.data.len() >= b.max_index());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|x| *x *= beta);
        return;
    }
    let par = if m * n * k >= PARALLEL_FLOPS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides can reach, and `c` is
    // a unique borrow not aliased by `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for k in 0..a.cols {
                    s += a.data[i * a.rs + k * a.cs] as f64 * b.data[k * b.rs + j * b.cs] as f64;
                }
                c[i * b.cols + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn strided_products_match_naive() {
        let a: Vec<f32> = (0..7 * 5).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..5 * 9).map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0).collect();
        for (am, bm) in [
            (Mat::rm(&a, 7, 5), Mat::rm(&b, 5, 9)),
            (Mat::rm_t(&a, 5, 7), Mat::rm(&b, 7, 6)),
            (Mat::rm(&a, 7, 5), Mat::rm_t(&b, 5, 9)),
        ] {
            let want = naive(am, bm);
            let mut got = vec![1.0; want.len()];
            matmul(&mut got, am, bm, 1.0, 0.0);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
            let mut acc = want.clone();
            matmul(&mut acc, am, bm, 2.0, 1.0);
            for (g, w) in acc.iter().zip(&want) {
                assert!((g - 3.0 * w).abs() < 1e-3);
            }
        }
    }
}
