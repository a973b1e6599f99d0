//! The `myelin` binary: parses the command line and calls one function per subcommand.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use myelin::cli::{self, Args, Command};

fn main() -> std::process::ExitCode {
    few_malloc_arenas();
    let args: Args = argh::from_env();
    if let Command::PluginRun(run) = &args.command {
        myelin::logging::init_plugin_child(&args.log_level);
        return match myelin::host::child::plugin_run(&run.instance) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // A reader that stops early (`myelin peers | head`, `| grep -q`) ends a printing command
    // quietly, as it does any Unix tool, instead of a panic in println!. The node (`up`, the
    // lab) keeps SIGPIPE ignored: its sockets report a closed peer as an error.
    if !matches!(
        args.command,
        Command::Up(_) | Command::Lab(_) | Command::Join(_)
    ) {
        // SAFETY: restoring a signal's default disposition, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    myelin::logging::init(&args.log_level, args.log_json);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates an arena of its own (up to eight per core), and
/// each keeps its freed memory apart from the others'. The node and its plugins run a few
/// dozen threads but allocate nothing on the packet path: two arenas cost them less memory
/// idle (docs/benchmarks.md, "Memory of a robot node"). `MALLOC_ARENA_MAX` in the
/// environment still decides; musl has no arenas.
fn few_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: sets one of glibc's allocator tunables, before any thread is started.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let runtime = || -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?)
    };
    match &args.command {
        Command::Keygen(_) => cli::keygen(),
        Command::Pubkey(_) => cli::pubkey(),
        Command::Init(a) => cli::init(a),
        Command::Ca(a) => cli::ca(a),
        Command::Join(a) => runtime()?.block_on(cli::join(a)),
        Command::Version(a) => cli::version(a),
        Command::Up(a) => runtime()?.block_on(myelin::node::up(&a.config)),
        Command::Status(a) => runtime()?.block_on(cli::status(a)),
        Command::Peers(a) => runtime()?.block_on(cli::peers(a)),
        Command::Members(a) => runtime()?.block_on(cli::members(a)),
        Command::Fleet(a) => runtime()?.block_on(cli::fleet(a)),
        Command::Firewall(a) => runtime()?.block_on(cli::firewall(a)),
        Command::Whois(a) => runtime()?.block_on(cli::whois(a)),
        Command::Plugins(a) => runtime()?.block_on(cli::plugins(a)),
        Command::Safety(a) => runtime()?.block_on(cli::safety(a)),
        Command::Lab(a) => runtime()?.block_on(cli::lab(a)),
        Command::PluginRun(_) => Ok(()),
    }
}
