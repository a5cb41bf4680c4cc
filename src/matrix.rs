//! Borrowed 2-D row-major matrix views (`rows`, `cols`, `ld`, `dtype`) over raw memory.
//!
//! Views are how every kernel sees data: weights inside a memory map, caller buffers from the
//! C ABI, owned adapter tensors. Element access is unaligned-safe because safetensors does not
//! promise aligned tensor offsets.

use crate::dtype::{self, DType, Element};
use crate::error::{Error, Result};
use std::marker::PhantomData;

/// A read-only matrix view. Element (i, j) lives at `ptr + (i * ld + j) * dtype.size()`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    ptr: *const u8,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    _life: PhantomData<&'a [u8]>,
}

/// A writable matrix view.
#[derive(Debug)]
pub struct MatMut<'a> {
    ptr: *mut u8,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    _life: PhantomData<&'a mut [u8]>,
}

// SAFETY: views are plain pointers to memory the owner keeps alive for 'a; MatRef is read-only.
// MatMut is only shared across threads by kernels that write disjoint rows/columns.
unsafe impl Send for MatRef<'_> {}
unsafe impl Sync for MatRef<'_> {}
unsafe impl Send for MatMut<'_> {}
unsafe impl Sync for MatMut<'_> {}

/// Number of elements a view of this shape spans: (rows - 1) * ld + cols, checked.
pub fn span_elems(rows: usize, cols: usize, ld: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(ld)?.checked_add(cols)
}

/// The stride views store: an empty matrix, or a single row, spans nothing past its first row
/// whatever its ld, so ld becomes cols there and no kernel can form a row stride `ld * size` that
/// overflows (found by fuzz/linear_args: 5 x 0 and 1 x n with ld = 2^62).
fn canonical_ld(rows: usize, cols: usize, ld: usize) -> usize {
    if rows <= 1 || cols == 0 {
        cols
    } else {
        ld
    }
}

/// Bytes a view of this shape spans (`None` on overflow). For a block-quantized dtype, `cols`
/// and `ld` must be whole blocks (`check_shape` says so first).
pub fn span_bytes(rows: usize, cols: usize, ld: usize, dtype: DType) -> Option<usize> {
    dtype.bytes(span_elems(rows, cols, ld)?)
}

/// For a block-quantized dtype: `cols` and `ld` must be whole blocks, so that every row starts
/// on a block (rows are addressed by `ld / block` blocks).
pub fn check_blocks(what: &str, cols: usize, ld: usize, dtype: DType) -> Result<()> {
    let b = dtype.block_elems();
    if !cols.is_multiple_of(b) || !ld.is_multiple_of(b) {
        return Err(Error::shape(format!(
            "{what}: {} needs cols ({cols}) and ld ({ld}) to be multiples of its {b}-element block",
            dtype.name()
        )));
    }
    Ok(())
}

fn check_shape(what: &str, rows: usize, cols: usize, ld: usize, dtype: DType) -> Result<usize> {
    if ld < cols {
        return Err(Error::shape(format!("{what}: ld {ld} < cols {cols}")));
    }
    check_blocks(what, cols, canonical_ld(rows, cols, ld), dtype)?;
    let n = span_bytes(rows, cols, canonical_ld(rows, cols, ld), dtype)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| Error::shape(format!("{what}: {rows} x {cols} (ld {ld}) overflows")))?;
    Ok(n)
}

impl<'a> MatRef<'a> {
    /// A view over a typed slice; checks that the slice covers the shape.
    pub fn from_slice<T: Element>(
        data: &'a [T],
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Self> {
        let bytes = check_shape("matrix", rows, cols, ld, T::DTYPE)?;
        if bytes > std::mem::size_of_val(data) {
            return Err(Error::shape(format!(
                "matrix: {rows} x {cols} (ld {ld}) needs {} elements, slice has {}",
                bytes / T::DTYPE.size(),
                data.len()
            )));
        }
        // SAFETY: the slice outlives 'a and covers the span, checked above.
        Ok(unsafe { Self::from_raw(data.as_ptr() as *const u8, T::DTYPE, rows, cols, ld) })
    }

    /// A view over raw bytes of `dtype`; checks that the bytes cover the shape.
    pub fn from_bytes(
        data: &'a [u8],
        dtype: DType,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Self> {
        let bytes = check_shape("matrix", rows, cols, ld, dtype)?;
        if bytes > data.len() {
            return Err(Error::shape(format!(
                "matrix: {rows} x {cols} (ld {ld}) exceeds its {} bytes",
                data.len()
            )));
        }
        // SAFETY: covered above.
        Ok(unsafe { Self::from_raw(data.as_ptr(), dtype, rows, cols, ld) })
    }

    /// # Safety
    /// `ptr` must point to memory valid for reads of the span of this shape for 'a, and
    /// `ld >= cols`.
    pub unsafe fn from_raw(
        ptr: *const u8,
        dtype: DType,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Self {
        MatRef {
            ptr,
            dtype,
            rows,
            cols,
            ld: canonical_ld(rows, cols, ld),
            _life: PhantomData,
        }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Pointer to the start of row `i`.
    #[inline(always)]
    pub fn row_ptr(&self, i: usize) -> *const u8 {
        debug_assert!(i < self.rows);
        // SAFETY: i < rows, so the offset stays inside the span (whose byte size was checked;
        // for quantized dtypes ld is whole blocks).
        unsafe {
            self.ptr
                .add(i * (self.ld / self.dtype.block_elems()) * self.dtype.size())
        }
    }

    /// Element (i, j) as f32.
    #[inline(always)]
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.rows && j < self.cols);
        // SAFETY: bounds checked above; the view covers its span. Row-relative, so a quantized
        // element is found from its row's first block.
        unsafe { dtype::load_f32(self.row_ptr(i), self.dtype, j) }
    }

    /// Copies row `i`, columns `c0..c0 + out.len()`, into `out` as f32.
    #[inline]
    pub fn row_f32(&self, i: usize, c0: usize, out: &mut [f32]) {
        assert!(i < self.rows && c0 + out.len() <= self.cols);
        if self.dtype.is_quantized() {
            // SAFETY: bounds checked above; rows are whole blocks.
            unsafe { crate::quant::dequant_range(self.row_ptr(i), self.dtype, c0, out) };
            return;
        }
        // SAFETY: bounds checked above.
        unsafe {
            dtype::convert_to_f32(self.row_ptr(i).add(c0 * self.dtype.size()), self.dtype, out)
        }
    }

    /// The first `rows` rows and `cols` columns (a truncation; same ld).
    pub fn top_left(&self, rows: usize, cols: usize) -> MatRef<'a> {
        assert!(rows <= self.rows && cols <= self.cols);
        MatRef {
            rows,
            cols,
            ..*self
        }
    }

    /// Rows `r0..r0+rows` (all columns).
    pub fn row_range(&self, r0: usize, rows: usize) -> MatRef<'a> {
        assert!(r0 + rows <= self.rows);
        let ptr = if rows == 0 {
            self.ptr
        } else {
            self.row_ptr(r0)
        };
        MatRef { ptr, rows, ..*self }
    }

    /// Copies the matrix into a dense f32 vector (rows x cols).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows * self.cols];
        for i in 0..self.rows {
            self.row_f32(i, 0, &mut v[i * self.cols..(i + 1) * self.cols]);
        }
        v
    }
}

impl<'a> MatMut<'a> {
    pub fn from_slice<T: Element>(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Self> {
        let bytes = check_shape("matrix", rows, cols, ld, T::DTYPE)?;
        if bytes > std::mem::size_of_val(data) {
            return Err(Error::shape(format!(
                "matrix: {rows} x {cols} (ld {ld}) needs {} elements, slice has {}",
                bytes / T::DTYPE.size(),
                data.len()
            )));
        }
        // SAFETY: the slice is exclusively borrowed for 'a and covers the span.
        Ok(unsafe { Self::from_raw(data.as_mut_ptr() as *mut u8, T::DTYPE, rows, cols, ld) })
    }

    /// # Safety
    /// `ptr` must point to memory valid for reads and writes of the span for 'a, not aliased by
    /// any other live view, and `ld >= cols`.
    pub unsafe fn from_raw(
        ptr: *mut u8,
        dtype: DType,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Self {
        MatMut {
            ptr,
            dtype,
            rows,
            cols,
            ld: canonical_ld(rows, cols, ld),
            _life: PhantomData,
        }
    }

    pub fn as_ref(&self) -> MatRef<'_> {
        // SAFETY: same memory, read-only, for a shorter lifetime.
        unsafe { MatRef::from_raw(self.ptr, self.dtype, self.rows, self.cols, self.ld) }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    #[inline(always)]
    pub fn row_ptr(&self, i: usize) -> *mut u8 {
        debug_assert!(i < self.rows);
        // SAFETY: i < rows keeps the offset inside the span.
        unsafe {
            self.ptr
                .add(i * (self.ld / self.dtype.block_elems()) * self.dtype.size())
        }
    }

    #[inline(always)]
    pub fn set(&mut self, i: usize, j: usize, v: f32) {
        assert!(i < self.rows && j < self.cols);
        // SAFETY: bounds checked; exclusive view.
        unsafe { dtype::store_f32(self.ptr, self.dtype, i * self.ld + j, v) }
    }

    /// Writes `vals` (f32) into row `i` from column `c0`, rounding to the view's dtype.
    #[inline]
    pub fn set_row_f32(&mut self, i: usize, c0: usize, vals: &[f32]) {
        assert!(i < self.rows && c0 + vals.len() <= self.cols);
        // SAFETY: bounds checked; exclusive view.
        unsafe {
            dtype::convert_from_f32(
                vals,
                self.row_ptr(i).add(c0 * self.dtype.size()),
                self.dtype,
            )
        }
    }

    /// A pointer-copy of this view for kernels that split the writes across threads.
    ///
    /// # Safety
    /// Callers must make the threads write disjoint elements.
    pub unsafe fn alias(&self) -> MatMut<'a> {
        MatMut {
            ptr: self.ptr,
            ..*self
        }
    }
}

/// An owned, dense, row-major matrix (ld = cols) of any dtype. Used for adapter tensors that are
/// not mapped from a file and for test data.
#[derive(Clone, Debug)]
pub struct Matrix {
    data: Vec<u8>,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn zeros(dtype: DType, rows: usize, cols: usize) -> Result<Self> {
        if dtype.is_quantized() {
            // Owned matrices are written element by element; blocks cannot be.
            return Err(Error::dtype(format!(
                "cannot make a {} matrix: block-quantized data is read from files only",
                dtype.name()
            )));
        }
        let bytes = check_shape("matrix", rows, cols, cols.max(1), dtype)?;
        let mut data = Vec::new();
        data.try_reserve_exact(bytes)
            .map_err(|_| Error::oom(format!("cannot allocate {rows} x {cols} {}", dtype.name())))?;
        data.resize(bytes, 0);
        Ok(Matrix {
            data,
            dtype,
            rows,
            cols,
        })
    }
    /// A matrix of `dtype` with values rounded from `vals` (row-major, rows x cols).
    pub fn from_f32(dtype: DType, rows: usize, cols: usize, vals: &[f32]) -> Result<Self> {
        if vals.len() != rows * cols {
            return Err(Error::shape(format!(
                "{} values for a {rows} x {cols} matrix",
                vals.len()
            )));
        }
        let mut m = Self::zeros(dtype, rows, cols)?;
        // SAFETY: m holds rows*cols elements of dtype.
        unsafe { dtype::convert_from_f32(vals, m.data.as_mut_ptr(), dtype) };
        Ok(m)
    }
    pub fn from_bytes(dtype: DType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        check_blocks("matrix", cols, cols.max(1), dtype)?;
        let want = rows.checked_mul(cols).and_then(|e| dtype.bytes(e));
        if Some(data.len()) != want {
            return Err(Error::shape(format!(
                "{} bytes for a {rows} x {cols} {} matrix",
                data.len(),
                dtype.name()
            )));
        }
        Ok(Matrix {
            data,
            dtype,
            rows,
            cols,
        })
    }
    pub fn view(&self) -> MatRef<'_> {
        // SAFETY: data covers rows*cols elements.
        unsafe {
            MatRef::from_raw(
                self.data.as_ptr(),
                self.dtype,
                self.rows,
                self.cols,
                self.cols.max(1),
            )
        }
    }
    pub fn view_mut(&mut self) -> MatMut<'_> {
        // SAFETY: data covers rows*cols elements, borrowed exclusively.
        unsafe {
            MatMut::from_raw(
                self.data.as_mut_ptr(),
                self.dtype,
                self.rows,
                self.cols,
                self.cols.max(1),
            )
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_check_their_span() {
        let v = vec![0f32; 10];
        assert!(MatRef::from_slice(&v, 2, 5, 5).is_ok());
        assert!(MatRef::from_slice(&v, 2, 4, 6).is_ok()); // 6 + 4 = 10
        assert_eq!(
            MatRef::from_slice(&v, 2, 5, 6).unwrap_err().status,
            crate::Status::Shape
        );
        assert_eq!(
            MatRef::from_slice(&v, 2, 5, 4).unwrap_err().status,
            crate::Status::Shape
        );
        assert!(MatRef::from_slice(&v, usize::MAX / 2, 5, 5).is_err());
    }
}
