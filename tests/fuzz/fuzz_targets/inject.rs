#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| emissary_fuzz::inject(data));
