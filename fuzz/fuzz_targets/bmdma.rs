#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrovm::fuzz::emulated::bmdma(data));
