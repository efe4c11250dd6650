fn main() -> std::process::ExitCode {
    mail_dispatch::main()
}
