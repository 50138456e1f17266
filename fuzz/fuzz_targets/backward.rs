#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| batchnorm_fuzz::check_backward(data));
