#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tapestry_fuzz_targets::cni_args(data));
