//! C pointers to Rust references: the only `unsafe` of the C ABI.
//!
//! Every buffer crosses the boundary as a pointer and an element count.
//! Before a reference is made, the pair is checked: a null pointer is
//! accepted only with a count of 0 (an empty slice; the pointer is never
//! read), a non-empty buffer must be aligned for its element type and no
//! longer than `isize::MAX` bytes (what `core::slice::from_raw_parts`
//! requires of any valid allocation), and an output must not overlap any
//! other buffer of the same call (a `&mut` slice may alias nothing).
//! What these checks cannot see — that the pointer really addresses that
//! many initialized elements, and that no other thread writes them during
//! the call — is the caller's side of the contract, stated on every
//! exported function.

use crate::bn_status;

/// The bytes one buffer of a call covers, for the overlap check.
#[derive(Clone, Copy)]
pub(crate) struct Region {
    start: usize,
    bytes: usize,
}

impl Region {
    /// `len` elements of `T` at `ptr` (nothing when `ptr` is null or `len`
    /// is 0: such a buffer is never read or written).
    pub(crate) fn of<T>(ptr: *const T, len: usize) -> Region {
        let bytes = if ptr.is_null() {
            0
        } else {
            len.saturating_mul(core::mem::size_of::<T>())
        };
        Region {
            start: ptr as usize,
            bytes,
        }
    }

    /// Whether the two regions share a byte.
    fn overlaps(self, other: Region) -> bool {
        self.bytes != 0
            && other.bytes != 0
            && self.start < other.start.saturating_add(other.bytes)
            && other.start < self.start.saturating_add(self.bytes)
    }
}

/// `Err(BN_ERR_OVERLAP)` when an output shares a byte with another output
/// or with an input (inputs may overlap each other: they are only read).
/// A buffer longer than any allocation can be is `BN_ERR_LENGTH` first.
pub(crate) fn disjoint(outputs: &[Region], inputs: &[Region]) -> Result<(), bn_status> {
    if outputs
        .iter()
        .chain(inputs)
        .any(|r| r.bytes > isize::MAX as usize)
    {
        return Err(bn_status::BN_ERR_LENGTH);
    }
    for (i, out) in outputs.iter().enumerate() {
        let later_outputs = outputs.iter().skip(i + 1);
        if later_outputs.chain(inputs).any(|r| out.overlaps(*r)) {
            return Err(bn_status::BN_ERR_OVERLAP);
        }
    }
    Ok(())
}

/// The checks every buffer passes before it becomes a slice: `Ok(false)`
/// for an empty buffer (never dereferenced), `Ok(true)` for a non-empty
/// one that is non-null, aligned and of a size an allocation can have.
fn check<T>(ptr: *const T, len: usize) -> Result<bool, bn_status> {
    if len == 0 {
        return Ok(false);
    }
    if ptr.is_null() {
        return Err(bn_status::BN_ERR_NULL_POINTER);
    }
    if !ptr.is_aligned() {
        return Err(bn_status::BN_ERR_MISALIGNED);
    }
    let size = core::mem::size_of::<T>().max(1);
    if len > isize::MAX as usize / size {
        return Err(bn_status::BN_ERR_LENGTH);
    }
    Ok(true)
}

/// The `len` elements at `ptr` as a shared slice.
///
/// # Safety
///
/// When `len > 0`, `ptr` must point to `len` initialized `T`s that nothing
/// writes while the returned slice is alive.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> Result<&'a [T], bn_status> {
    if !check(ptr, len)? {
        return Ok(&[]);
    }
    // SAFETY: `check` proved `ptr` non-null, aligned for `T`, and
    // `len * size_of::<T>() <= isize::MAX`; the caller guarantees that it
    // addresses `len` initialized `T`s not written during the slice's life.
    Ok(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// The `len` elements at `ptr` as a mutable slice.
///
/// # Safety
///
/// When `len > 0`, `ptr` must point to `len` initialized `T`s that nothing
/// else reads or writes while the returned slice is alive (the caller of
/// this function checks, with [`disjoint`], that no other buffer of the
/// same call overlaps it).
pub(crate) unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize) -> Result<&'a mut [T], bn_status> {
    if !check(ptr, len)? {
        return Ok(&mut []);
    }
    // SAFETY: `check` proved `ptr` non-null, aligned for `T`, and the size
    // in bounds; the caller guarantees `len` initialized `T`s with no other
    // access (no overlap with another argument: `disjoint`) during its life.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr, len) })
}

/// An optional per-channel array: `None` for a null pointer (the parameter
/// is absent: scale 1, offset 0), else the `len` elements at `ptr`.
///
/// # Safety
///
/// As [`slice`] when `ptr` is not null.
pub(crate) unsafe fn optional<'a, T>(
    ptr: *const T,
    len: usize,
) -> Result<Option<&'a [T]>, bn_status> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's guarantee for a non-null `ptr` is `slice`'s.
    unsafe { slice(ptr, len) }.map(Some)
}

/// A copy of the `T` at `ptr`.
///
/// # Safety
///
/// When `ptr` is not null, it must point to an initialized `T`.
pub(crate) unsafe fn read<T: Copy>(ptr: *const T) -> Result<T, bn_status> {
    check(ptr, 1)?;
    // SAFETY: `check` proved `ptr` non-null and aligned; the caller
    // guarantees an initialized `T` there. `T: Copy`, so reading it
    // leaves the original valid.
    Ok(unsafe { ptr.read() })
}

/// Stores `value` at `ptr`.
///
/// # Safety
///
/// When `ptr` is not null, it must be valid for a write of a `T`, and no
/// reference to that memory may be alive.
pub(crate) unsafe fn write<T: Copy>(ptr: *mut T, value: T) -> Result<(), bn_status> {
    check(ptr, 1)?;
    // SAFETY: `check` proved `ptr` non-null and aligned; the caller
    // guarantees it is valid for writes with no live reference. `T: Copy`,
    // so the old value needs no drop.
    unsafe { ptr.write(value) };
    Ok(())
}
