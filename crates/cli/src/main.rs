// Measured: the worker's threads spent 12 % of their time in glibc's malloc and
// free; with mimalloc the worker's CPU per job fell by 15 % (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mail_dispatch::main()
}
