"""What the web and worker processes share: settings, the record, the store, the job contract."""
