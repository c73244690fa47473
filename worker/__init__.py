"""The conversion worker process: rq jobs that read originals back and write variants."""
