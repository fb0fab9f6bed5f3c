#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrovm::fuzz::emulated::e1000(data));
