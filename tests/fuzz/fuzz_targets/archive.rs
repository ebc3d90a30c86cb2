#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| emissary_fuzz::archive(data));
