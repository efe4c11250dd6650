//! The `mail-dispatch` program, as the end-to-end suite runs it.
fn main() -> std::process::ExitCode {
    mail_dispatch::main()
}
