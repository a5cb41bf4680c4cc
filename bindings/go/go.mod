module github.com/rankfuse/rankfuse/bindings/go

go 1.19
