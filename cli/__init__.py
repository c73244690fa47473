"""`picstream`: the command-line client of the picstream HTTP API.

It speaks HTTP only (httpx2): it imports nothing of `api`, `worker`, `core` or `admin`
(an import-linter contract in pyproject.toml keeps it so), so it works against any
deployment and is what a user of the service, not an operator of it, runs.

    config.py    where the endpoint and key come from (flags, environment, config file)
    client.py    the HTTP session: auth, problem+json errors, unreachable servers
    tus.py       a tus 1.0 client: create, PATCH in chunks from disk, resume from HEAD
    pending.py   the uploads in progress on this machine, so a killed run resumes them
    upload.py    `picstream upload`: files to results, concurrently, with progress
    events.py    Server-Sent Events of an image until its conversion ends
    download.py  `picstream get`: resumable, verified downloads
    output.py    tables, JSON and sizes for people and scripts
    main.py      the commands (click): the composition root
"""
