//! What Tapestry's tc programs in `src/bin/` share: bounds-checked packet access, address and
//! port rewrites with checksum fix-up, the reject reply, and the definitions of every map.
//!
//! The load-balancing path is factored as Cilium's is: parse -> service lookup -> backend
//! selection -> conntrack (new flow or reply) -> rewrite with checksum fix-up. Each step returns
//! `Result<_, DropReason>`, and the program entry point turns an error into an explicit, counted
//! verdict. The steps that use maps live with the program whose object carries those maps
//! (src/bin/lb/), since a map static in this library would land in every object (`maps`).
#![no_std]

pub mod fib;
pub mod maps;
pub mod nat;
pub mod packet;
pub mod reject;

/// Reads a `.rodata` constant the loader rewrote per load (a guest's addresses, a limit): the
/// volatile read keeps the compiler from folding in the initial value.
#[inline(always)]
pub fn constant<T: Copy>(v: &T) -> T {
    // SAFETY: `v` is a reference, so valid, aligned and initialised.
    unsafe { core::ptr::read_volatile(v) }
}

/// Verdicts, as tc and TCX read them.
pub mod verdict {
    /// Not ours: let the next program (or the stack) decide. With TCX this is TCX_NEXT, so a
    /// program that runs after ours (a primary CNI's, kube-proxy's path) still sees the packet.
    pub const NEXT: i32 = -1;
    /// Ours, handled: continue into the stack (after a rewrite).
    pub const OK: i32 = 0;
    pub const DROP: i32 = 2;
}
