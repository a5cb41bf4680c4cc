// swift-tools-version:5.7
// rankfuse for Swift: a system-library target over the C header (found with pkg-config) and a
// thin Swift layer. Not compiled by CI (no Swift toolchain on the build machines): see README.md.
import PackageDescription

let package = Package(
    name: "Rankfuse",
    products: [
        .library(name: "Rankfuse", targets: ["Rankfuse"]),
    ],
    targets: [
        .systemLibrary(
            name: "CRankfuse",
            path: "Sources/CRankfuse",
            pkgConfig: "rankfuse"
        ),
        .target(name: "Rankfuse", dependencies: ["CRankfuse"]),
        .testTarget(name: "RankfuseTests", dependencies: ["Rankfuse"]),
    ]
)
