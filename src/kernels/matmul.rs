//! Matrix products for the parallel paths: the weight products `x · Wᵀ` of prefill chunks
//! ([`linear`], on [`super::sgemm`] at the kernels' level), and general strided products
//! ([`gemm_f32`], on the `gemm` crate: the FAVOR+ chunked attention's and the softmax
//! baseline's).

use super::Elem;

/// The instruction-set level the `gemm` crate runs [`gemm_f32`]'s products at (the chunked
/// attention's, not the weights'): its own run-time choice (`avx512` where the CPU has
/// AVX-512F, else `avx2` with FMA, else `portable`), made as that crate makes it.
/// [`super::isa::ISA_ENV`] does not reach it; the weight products ([`linear`]) follow it.
pub fn gemm_level() -> super::Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return super::Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return super::Isa::Avx2;
        }
    }
    super::Isa::Portable
}

/// Work below which gemm runs on one thread (multiply-adds).
const PAR_MIN_MACS: usize = 1 << 20;

fn parallelism(macs: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && macs >= PAR_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// A strided read-only f32 matrix: element (i, j) at `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            data: self.data,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view exceeds its slice");
        }
    }
}

/// `c = beta·c + a·b` (`beta` 0 or 1), `c` row-major `a.rows × b.cols` with row stride
/// `c_stride`; large products split across the rayon pool.
pub fn gemm_f32(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], c_stride: usize, accumulate: bool) {
    gemm_f32_with(a, b, c, c_stride, accumulate, true)
}

/// [`gemm_f32`] on the calling thread only: for products that are themselves one of many run
/// in parallel (the FAVOR+ chunk's per-head products), where splitting each again would only
/// add hand-offs.
pub fn gemm_f32_serial(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    c_stride: usize,
    accumulate: bool,
) {
    gemm_f32_with(a, b, c, c_stride, accumulate, false)
}

fn gemm_f32_with(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    c_stride: usize,
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    a.check();
    b.check();
    assert!((m - 1) * c_stride + n <= c.len(), "gemm: output too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * c_stride..r * c_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm touches inside `a.data`, `b.data` and
    // `c` (the last element of each view is in bounds and strides are non-negative); `c` is a
    // unique borrow, so it does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if parallel {
                parallelism(m * n * k)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// `y = x · Wᵀ` for `x` of shape `[rows, in]` and a torch `Linear` weight `W` of shape
/// `[out, in]`, any weight dtype; `y` is `[rows, out]`. One row is a matrix-vector product;
/// more are [`super::sgemm::linear`] at the process's level (half-precision weights widened as
/// they are packed, never as a whole-matrix copy).
pub fn linear<T: Elem>(x: &[f32], rows: usize, w: &[T], out: usize, y: &mut [f32]) {
    let inp = x.len().checked_div(rows).unwrap_or(0);
    assert_eq!(w.len(), out * inp, "linear: weight is not [out, in]");
    if rows == 1 {
        // The matrix-vector kernel splits rows across the pool and reads half-precision
        // weights without widening them first.
        super::matvec(w, &x[..inp], &mut y[..out]);
        return;
    }
    super::sgemm::linear(super::isa::active(), x, rows, w, out, y);
}
