module duphunter/tests/producers/containerd-gzip

go 1.26
