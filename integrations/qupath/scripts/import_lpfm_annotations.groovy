/*
 * lpfm-toolkit: load the carried-over annotations of lpfm results into their entries.
 *
 * `lpfm qupath enhance` (file backend) cannot write QuPath's .qpdata, so it writes each result's
 * annotations (clipped to the region, shifted, rescaled for super-resolution) to a GeoJSON file beside
 * the output and records its path in the entry metadata key `lpfm.annotations` (relative to the project).
 * This script adds them to each result entry once, then marks the entry `lpfm.annotations.imported`.
 *
 * Use: open the project in QuPath, Automate › Script editor, open this file, Run.
 * Written for QuPath 0.4–0.7. NOT run in CI: no QuPath there. Licence: GPL-3.0-or-later (lpfm-toolkit).
 */
import qupath.lib.io.PathIO

def project = getProject()
if (project == null) {
    println 'lpfm: open a project first'
    return
}
def base = new File(PROJECT_BASE_DIR)
int imported = 0
for (entry in project.getImageList()) {
    def rel = entry.getMetadataValue('lpfm.annotations')
    if (rel == null || entry.getMetadataValue('lpfm.annotations.imported') != null)
        continue
    def file = new File(rel)
    if (!file.isAbsolute())
        file = new File(base, rel)
    if (!file.isFile()) {
        println "lpfm: ${entry.getImageName()}: ${file} is missing, skipped"
        continue
    }
    def objects = PathIO.readObjects(file.toPath())
    def imageData = entry.readImageData()
    imageData.getHierarchy().addObjects(objects)
    entry.saveImageData(imageData)
    entry.putMetadataValue('lpfm.annotations.imported', new Date().toInstant().toString())
    println "lpfm: ${objects.size()} annotations → ${entry.getImageName()}"
    imported++
}
project.syncChanges()
println "lpfm: imported annotations into ${imported} entries"
