"""The metadata store: SQLAlchemy models, small repositories over one engine, migrations.

``MetadataStore(url)`` (in ``store``) opens a SQLite file or a PostgreSQL database,
creating or upgrading its schema by Alembic migration (safe when processes race), and
holds one repository per noun::

    store.datasets     add(version=, name=, source_uri=, n_records=, records_sha256=, ...)
                       get(version_or_prefix), all()
    store.runs         create(run_id, pipeline=, project=, config=, ...), update(run_id, **f),
                       get(run_id_or_prefix), recent(limit), claim(run_id) -> RunClaim
    store.steps        start(run_id, step, cache_key=, code_version=, ...) -> id,
                       finish(step_id, status=, ...), find_cached(step, key), for_run(run_id)
    store.trials       record(run_id, number, state=, ...), for_run(run_id)
    store.models       register(name, bundle_uri=, bundle_sha256=, ...) -> Registration,
                       get(name, version, alias), resolve(ref), versions(name, include_archived=),
                       aliases(name), set_alias(name, alias, version, expected=),
                       delete_alias(name, alias, expected=), archive_version(name, version),
                       unarchive_version(name, version), as_dict(mv)
    store.audit        record(actor, action, subject, **details), recent(limit)
    store.predictions  log(rows), record_feedback(items, labels), find(...), count(...),
                       feedback(prediction_ids)
    store.alerts       open_alert(...) -> AlertRecord | None, transition(id, from, to), list, ...

Every change that must not race is one atomic statement or one serialised transaction
(see ``database``): concurrent callers, in threads or processes, never see an
IntegrityError. Row classes are in ``models``; ``store.session()`` is a raw write session.
"""
