"""What the people who build and study jobs run, never shipped to a site: job export and the simulator, results
reports, the benchmark, performance and GPU checks, generated docs, demo federations."""
