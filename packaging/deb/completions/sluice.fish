# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_sluice_global_optspecs
    string join \n h/help V/version
end

function __fish_sluice_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_sluice_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_sluice_using_subcommand
    set -l cmd (__fish_sluice_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c sluice -n "__fish_sluice_needs_command" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_needs_command" -s V -l version -d 'Print version'
complete -c sluice -n "__fish_sluice_needs_command" -f -a "run" -d 'Run the agent with a configuration file'
complete -c sluice -n "__fish_sluice_needs_command" -f -a "check" -d 'Validate a configuration file and the files it names (TLS, passwords, tables) and print it with every default filled in'
complete -c sluice -n "__fish_sluice_needs_command" -f -a "outbox" -d 'Inspect the outbox named in a configuration file'
complete -c sluice -n "__fish_sluice_needs_command" -f -a "sketch" -d 'Work with the sketches that aggregate records carry'
complete -c sluice -n "__fish_sluice_needs_command" -f -a "demo" -d 'Run the pipeline on generated sensors; nothing to install or configure'
complete -c sluice -n "__fish_sluice_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sluice -n "__fish_sluice_using_subcommand run" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand run" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand check" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand check" -s q -l quiet -d 'Print only notes and errors, not the effective configuration (for the service\'s ExecStartPre)'
complete -c sluice -n "__fish_sluice_using_subcommand check" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "status" -d 'Backlog, its bytes, the oldest record\'s age, the next seq, the epoch, drops and dead letters (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "verify" -d 'SQLite\'s full integrity check and every record\'s checksum (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "dead-letters" -d 'List the records set aside as dead letters, with why (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "retry" -d 'Queue dead letters again, as new records at the end of the outbox'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "salvage" -d 'Forward what can be read of a damaged outbox file (one the agent moved aside): its readable records are queued in this outbox, each keeping its identity (epoch, seq) there, so upstream drops any it already holds'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "purge" -d 'Delete dead letters for good'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and not __fish_seen_subcommand_from status verify dead-letters retry salvage purge help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from status" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from verify" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from verify" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from dead-letters" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from dead-letters" -l payload -d 'Also print each record\'s payload'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from dead-letters" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from retry" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from retry" -l all -d 'Every dead letter'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from retry" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from salvage" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from salvage" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from purge" -s c -l config -d 'The TOML configuration file' -r -F
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from purge" -l all -d 'Every dead letter'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from purge" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "status" -d 'Backlog, its bytes, the oldest record\'s age, the next seq, the epoch, drops and dead letters (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "verify" -d 'SQLite\'s full integrity check and every record\'s checksum (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "dead-letters" -d 'List the records set aside as dead letters, with why (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "retry" -d 'Queue dead letters again, as new records at the end of the outbox'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "salvage" -d 'Forward what can be read of a damaged outbox file (one the agent moved aside): its readable records are queued in this outbox, each keeping its identity (epoch, seq) there, so upstream drops any it already holds'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "purge" -d 'Delete dead letters for good'
complete -c sluice -n "__fish_sluice_using_subcommand outbox; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and not __fish_seen_subcommand_from merge help" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and not __fish_seen_subcommand_from merge help" -f -a "merge" -d 'Merge the distinct-count sketches of aggregate records (JSON lines, as an upstream subscriber receives them; rules with `sketches = true`) and print each union\'s estimate, one JSON line per group'
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and not __fish_seen_subcommand_from merge help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and __fish_seen_subcommand_from merge" -l by -d 'Group per series and label, or per label across every series (a fleet\'s distinct values)' -r -f -a "series\t'Per series and label: each gateway\'s or sensor\'s distinct values over many windows'
label\t'Per label, across every series (and gateway): a fleet\'s distinct values'"
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and __fish_seen_subcommand_from merge" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and __fish_seen_subcommand_from help" -f -a "merge" -d 'Merge the distinct-count sketches of aggregate records (JSON lines, as an upstream subscriber receives them; rules with `sketches = true`) and print each union\'s estimate, one JSON line per group'
complete -c sluice -n "__fish_sluice_using_subcommand sketch; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sluice -n "__fish_sluice_using_subcommand demo" -l seconds -d 'Stop after this many seconds (default: run until Ctrl-C)' -r
complete -c sluice -n "__fish_sluice_using_subcommand demo" -l print-config -d 'Print the demo\'s configuration and exit'
complete -c sluice -n "__fish_sluice_using_subcommand demo" -s h -l help -d 'Print help'
complete -c sluice -n "__fish_sluice_using_subcommand help; and not __fish_seen_subcommand_from run check outbox sketch demo help" -f -a "run" -d 'Run the agent with a configuration file'
complete -c sluice -n "__fish_sluice_using_subcommand help; and not __fish_seen_subcommand_from run check outbox sketch demo help" -f -a "check" -d 'Validate a configuration file and the files it names (TLS, passwords, tables) and print it with every default filled in'
complete -c sluice -n "__fish_sluice_using_subcommand help; and not __fish_seen_subcommand_from run check outbox sketch demo help" -f -a "outbox" -d 'Inspect the outbox named in a configuration file'
complete -c sluice -n "__fish_sluice_using_subcommand help; and not __fish_seen_subcommand_from run check outbox sketch demo help" -f -a "sketch" -d 'Work with the sketches that aggregate records carry'
complete -c sluice -n "__fish_sluice_using_subcommand help; and not __fish_seen_subcommand_from run check outbox sketch demo help" -f -a "demo" -d 'Run the pipeline on generated sensors; nothing to install or configure'
complete -c sluice -n "__fish_sluice_using_subcommand help; and not __fish_seen_subcommand_from run check outbox sketch demo help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from outbox" -f -a "status" -d 'Backlog, its bytes, the oldest record\'s age, the next seq, the epoch, drops and dead letters (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from outbox" -f -a "verify" -d 'SQLite\'s full integrity check and every record\'s checksum (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from outbox" -f -a "dead-letters" -d 'List the records set aside as dead letters, with why (reads only)'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from outbox" -f -a "retry" -d 'Queue dead letters again, as new records at the end of the outbox'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from outbox" -f -a "salvage" -d 'Forward what can be read of a damaged outbox file (one the agent moved aside): its readable records are queued in this outbox, each keeping its identity (epoch, seq) there, so upstream drops any it already holds'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from outbox" -f -a "purge" -d 'Delete dead letters for good'
complete -c sluice -n "__fish_sluice_using_subcommand help; and __fish_seen_subcommand_from sketch" -f -a "merge" -d 'Merge the distinct-count sketches of aggregate records (JSON lines, as an upstream subscriber receives them; rules with `sketches = true`) and print each union\'s estimate, one JSON line per group'
