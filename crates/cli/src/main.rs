// A profile of the worker showed glibc's malloc and free among its largest costs;
// mimalloc lowers the worker's CPU per job, at the price of more memory mapped.
// The figures are in BENCHMARKS.md ("Commit `b080cf2`: mimalloc").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mail_dispatch::main()
}
