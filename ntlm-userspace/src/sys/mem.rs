//! The allocator's free memory, given back to the kernel.

/// Gives the memory glibc keeps free inside its heaps back to the kernel (malloc_trim(3):
/// madvise(MADV_DONTNEED) of free pages). Other allocators return memory by themselves, so
/// elsewhere this does nothing.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; callable from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
